"""Checkpoints: `last.pt` (everything needed to resume) and `ema.pt` (self-contained for inference).

Both are plain dicts of tensors and primitives, written atomically and read with
`torch.load(weights_only=True)`, so a checkpoint can never execute code.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import FlowConfig, ModelConfig, config_from_dict
from .errors import CheckpointError
from .fsutil import load_tensors, torch_save_atomic
from .model import FlowDiT
from .shards import LatentStats

FORMAT_VERSION = 1


def save_checkpoint(obj: dict, path: str | Path) -> None:
    torch_save_atomic({"format": FORMAT_VERSION, **obj}, path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint safely; CheckpointError naming the file if it is missing, truncated or foreign."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (train writes ema.pt and last.pt in its --out-dir)")
    obj = load_tensors(path, CheckpointError, "checkpoint: unreadable or truncated")
    if not isinstance(obj, dict) or "format" not in obj or "config" not in obj:
        raise CheckpointError(f"{path}: not a codicodec-flow checkpoint")
    if obj["format"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {obj['format']}, this version reads {FORMAT_VERSION}; "
                              f"use the codicodec-flow version that wrote it")
    return obj


def inference_dict(model_sd: dict, model_cfg: ModelConfig, flow_cfg: FlowConfig, stats: LatentStats,
                   codec: dict, step: int) -> dict:
    """What ema.pt holds: weights, configs, latent statistics and codec identity."""
    return {"kind": "inference", "model": model_sd, "config": {"model": asdict(model_cfg), "flow": asdict(flow_cfg)},
            "stats": stats.to_json(), "codec": codec, "step": step}


@dataclass
class Bundle:
    """A model ready for generation, with what it needs to interpret latents."""
    model: FlowDiT
    model_cfg: ModelConfig
    flow_cfg: FlowConfig
    stats: LatentStats
    codec: str
    codec_version: str
    step: int
    path: str


def load_bundle(path: str | Path, device: torch.device | str = "cpu") -> Bundle:
    """Load ema.pt (or the EMA weights of last.pt) as an eval-mode FlowDiT."""
    obj = load_checkpoint(path)
    try:
        model_cfg = config_from_dict(ModelConfig, obj["config"]["model"])
        flow_cfg = config_from_dict(FlowConfig, obj["config"]["flow"])
        weights = obj["ema"] if obj.get("kind") == "training" else obj["model"]
        model = FlowDiT(model_cfg)
        model.load_state_dict(weights)
        stats = LatentStats.from_json(obj["stats"])
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: checkpoint does not match this version's model "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    model.to(device).eval().requires_grad_(False)
    return Bundle(model, model_cfg, flow_cfg, stats, obj["codec"]["name"], obj["codec"].get("version", "?"),
                  int(obj.get("step", 0)), str(path))


def config_mismatch(saved: dict, wanted: dict) -> list[str]:
    """Fields whose values differ between a checkpoint's config section and the requested one."""
    return [f"{k}: checkpoint {saved.get(k)!r} vs requested {v!r}" for k, v in wanted.items() if saved.get(k) != v]
