"""Checkpoints: `last.pt` (everything needed to resume) and `ema.pt` (self-contained for inference).

Both are plain dicts of tensors and primitives, written atomically and read with
`torch.load(weights_only=True)`, so a checkpoint can never execute code. This module is the only
place that knows their layout:
    last.pt: {"format", "kind": "training", "model", "ema", "optimizer", "scheduler", "step",
              "rng": {"torch"}, "config": {"model", "flow", "train"}, "stats", "codec", "sampler"[, "init_from"]}
    ema.pt:  {"format", "kind": "inference", "model" (the EMA weights), "config": {"model", "flow"},
              "stats", "codec": {"name", "version"}, "step"[, "init_from"]}
"init_from" ({"path", "step"}), in both files of a run started with `train --init-from`, names the checkpoint
whose weights it started from.
Generation loads the EMA weights ("model" of ema.pt, "ema" of last.pt) unless asked for the raw ones
(`--weights raw`: "model" of last.pt; ema.pt has none).
A save writes ema.pt first and last.pt second, so a process killed between the two leaves ema.pt one save
ahead of last.pt, never behind: resuming from last.pt recomputes the same steps and rewrites both.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .codec import Codec
from .codec.prompt import open_codec
from .config import FlowConfig, ModelConfig, config_from_dict
from .errors import CheckpointError
from .latents import LatentStats
from .model import FlowDiT
from .util.fsutil import load_tensors, torch_save_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LAST, EMA = "last.pt", "ema.pt"  # the file names inside a run folder
WEIGHTS = ("ema", "raw")  # which weights generation loads: the EMA average, or (last.pt only) the raw training ones


def save_checkpoint(obj: dict, path: str | Path) -> None:
    torch_save_atomic({"format": FORMAT_VERSION, **obj}, path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint safely; CheckpointError naming the file if it is missing, truncated or foreign."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (train writes ema.pt and last.pt in its --out-dir)")
    obj = load_tensors(path, CheckpointError, "codicodec-flow checkpoint",
                       "; give the ema.pt or last.pt that `train` wrote")
    if not isinstance(obj, dict) or "format" not in obj or "config" not in obj:
        raise CheckpointError(f"{path}: not a codicodec-flow checkpoint")
    if obj["format"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {obj['format']}, this version reads {FORMAT_VERSION}; "
                              f"use the codicodec-flow version that wrote it")
    return obj


def inference_dict(model_sd: dict, model_cfg: ModelConfig, flow_cfg: FlowConfig, stats: LatentStats,
                   codec: dict, step: int) -> dict:
    """What ema.pt holds: weights, configs, latent statistics and codec identity."""
    return _inference(model_sd, {"model": asdict(model_cfg), "flow": asdict(flow_cfg)}, stats, codec, step)


def _inference(model_sd: dict, configs: dict, stats: LatentStats, codec: dict, step: int) -> dict:
    return {"kind": "inference", "model": model_sd, "config": {"model": configs["model"], "flow": configs["flow"]},
            "stats": stats.to_json(), "codec": codec, "step": step}


def save_training(out_dir: str | Path, model: torch.nn.Module, ema: torch.nn.Module, optimizer, scheduler, step: int,
                  configs: dict, stats: LatentStats, codec: dict, sampler: dict, init_from: dict | None = None) -> None:
    """Write the run's ema.pt (to generate) and then last.pt (to resume) into out_dir, each atomically.

    In this order a kill between the writes leaves ema.pt ahead of last.pt, which the resume catches up with;
    the other order could leave ema.pt a whole save interval behind the training state."""
    out = Path(out_dir)
    origin = {} if init_from is None else {"init_from": init_from}
    save_checkpoint({**_inference(ema.state_dict(), configs, stats, codec, step), **origin}, out / EMA)
    save_checkpoint({"kind": "training", "model": model.state_dict(), "ema": ema.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                     "rng": {"torch": torch.get_rng_state()}, "config": configs, "stats": stats.to_json(),
                     "codec": codec, "sampler": sampler, **origin}, out / LAST)


@dataclass
class TrainingCheckpoint:
    """A last.pt, read: what a resumed run needs to know before it rebuilds its objects, and their states."""
    path: Path
    step: int
    configs: dict  # {"model", "flow", "train"}: asdict() of the run's configs
    stats: LatentStats  # the normalisation the run started with
    codec: dict  # {"name", "version"} of the latents it trains on
    states: dict  # the whole file, for restore_training

    @property
    def init_from(self) -> dict | None:
        """{"path", "step"} of the checkpoint the run was started from with --init-from, if it was."""
        return self.states.get("init_from")

    def restore(self, model: torch.nn.Module, ema: torch.nn.Module, optimizer, scheduler) -> int:
        """Put the saved states back into a run's objects (and the torch RNG); returns the step to continue from."""
        try:
            model.load_state_dict(self.states["model"])
            ema.load_state_dict(self.states["ema"])
            optimizer.load_state_dict(self.states["optimizer"])
            scheduler.load_state_dict(self.states["scheduler"])
            torch.set_rng_state(self.states["rng"]["torch"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{self.path}: its saved training state does not fit the run it describes "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); {_NO_RESUME}") from None
        return self.step


TRAINING_KEYS = ("model", "ema", "optimizer", "scheduler", "step", "rng", "config", "stats", "codec")
_NO_RESUME = "resume from a backup copy of last.pt, or start a new run with another --out-dir"


def load_training(path: str | Path) -> TrainingCheckpoint:
    """Read a run's last.pt; CheckpointError naming the file, and what is missing, if it is not a complete one."""
    obj = load_checkpoint(path)
    if obj.get("kind") == "inference":
        raise CheckpointError(f"{path}: an inference checkpoint (ema.pt: weights only), which cannot resume "
                              f"training; {_NO_RESUME}")
    missing = [k for k in TRAINING_KEYS if k not in obj]
    if isinstance(obj.get("config"), dict):
        missing += [f"config.{k}" for k in ("model", "flow", "train") if not isinstance(obj["config"].get(k), dict)]
    if isinstance(obj.get("rng"), dict) and not isinstance(obj["rng"].get("torch"), torch.Tensor):
        missing.append("rng.torch")
    if isinstance(obj.get("codec"), dict) and "name" not in obj["codec"]:
        missing.append("codec.name")
    if missing:
        raise CheckpointError(f"{path}: not a complete training checkpoint of codicodec-flow (missing "
                              f"{', '.join(missing)}); {_NO_RESUME}")
    try:
        return TrainingCheckpoint(Path(path), int(obj["step"]), obj["config"], LatentStats.from_json(obj["stats"]),
                                  dict(obj["codec"]), obj)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:  # malformed values
        raise CheckpointError(f"{path}: not a training checkpoint (last.pt) of codicodec-flow "
                              f"({type(exc).__name__}: {exc}); {_NO_RESUME}") from None


@dataclass
class Weights:
    """The inference side of ema.pt or last.pt (its EMA weights, or last.pt's raw ones): what generation and a
    fine-tune start from."""
    path: Path
    kind: str  # "inference" (ema.pt) or "training" (last.pt)
    step: int
    model_cfg: ModelConfig
    flow_cfg: FlowConfig
    stats: LatentStats  # the normalisation the weights were trained with
    codec: dict  # {"name", "version"}
    state: dict  # the EMA weights (or the raw ones, which="raw")
    which: str = "ema"

    @property
    def record(self) -> dict:
        """What a run started from these weights records as its "init_from"."""
        return {"path": str(self.path.resolve()), "step": self.step}

    def load_into(self, model: torch.nn.Module) -> None:
        """Copy the weights into a FlowDiT of the same shape; CheckpointError naming the file if they do not fit. A
        model that adds the own-chunk mark to weights without it (train --init-from with the closing stage) starts it
        at zero."""
        state = self.state
        if getattr(model, "own_mark", None) is not None and "own_mark" not in state:
            state = {**state, "own_mark": torch.zeros_like(model.own_mark)}
        try:
            model.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{self.path}: checkpoint does not match this version's model "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def load_weights(path: str | Path, which: str = "ema") -> Weights:
    """Read the EMA weights of ema.pt or last.pt (which="raw": last.pt's raw training weights), with their configs,
    latent statistics and codec identity."""
    if which not in WEIGHTS:
        raise CheckpointError(f"unknown weights {which!r}: choose one of {', '.join(WEIGHTS)}")
    obj = load_checkpoint(path)
    kind = "training" if obj.get("kind") == "training" else "inference"
    if which == "raw" and kind != "training":
        raise CheckpointError(f"{path}: holds only the EMA weights (an ema.pt); the raw weights are in the run's "
                              f"{LAST} (same folder): give that file, or use the EMA weights (--weights ema)")
    try:
        codec = {"name": obj["codec"]["name"], "version": obj["codec"].get("version", "?")}
        return Weights(Path(path), kind, int(obj.get("step", 0)), config_from_dict(ModelConfig, obj["config"]["model"]),
                       config_from_dict(FlowConfig, obj["config"]["flow"]), LatentStats.from_json(obj["stats"]), codec,
                       obj["ema"] if kind == "training" and which == "ema" else obj["model"], which)
    except Exception as exc:  # malformed values
        raise CheckpointError(f"{path}: checkpoint does not match this version's model "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


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
    weights: str = "ema"  # which weights were loaded: "ema" or "raw"

    def open_codec(self, device, codec_ckpt: str | Path | None = None, trust: bool = False) -> Codec:
        """The codec this model's latents belong to, on `device` (a different codec version is noted)."""
        return open_codec(self.codec, self.codec_version, device, codec_ckpt, trust, self.path)


def load_bundle(path: str | Path, device: torch.device | str = "cpu", weights: str = "ema") -> Bundle:
    """Load ema.pt (or the EMA weights of last.pt; weights="raw": last.pt's raw weights) as an eval-mode FlowDiT."""
    w = load_weights(path, weights)
    model = FlowDiT(w.model_cfg)
    w.load_into(model)
    model.to(device).eval().requires_grad_(False)
    which = {"raw": "the raw weights of ", "ema": "the EMA weights of " if w.kind == "training" else ""}[weights]
    log.info(f"loaded {which}{path} (step {w.step})")
    return Bundle(model, w.model_cfg, w.flow_cfg, w.stats, w.codec["name"], w.codec["version"], w.step, str(path),
                  weights)


def config_mismatch(saved: dict, wanted: dict) -> list[str]:
    """Fields whose values differ between a checkpoint's config section and the requested one."""
    return [f"{k}: checkpoint {saved.get(k)!r} vs requested {v!r}" for k, v in wanted.items() if saved.get(k) != v]
