"""The latent shard format: one `.pt` file per audio file (or segment), a manifest, and latent statistics.

A shard is a plain dict `{"latents": float32 (T, 8, 64), "meta": {str: str | int | float}}` saved with
torch.save and read back with `torch.load(weights_only=True)`, so opening one can never run code.
`manifest.json` lists every shard with its metadata, the codec that made them and the per-channel
latent mean/std over all tokens (training bakes these into checkpoints).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..codec.base import CHUNK_SECONDS, LATENT_DIM, TOKENS_PER_CHUNK
from ..errors import DataError
from ..latents import LatentStats
from ..util.fsutil import load_tensors, torch_save_atomic, write_text_atomic

MANIFEST = "manifest.json"
SHARD_SUFFIX = ".pt"
FORMAT_VERSION = 1


@dataclass
class Shard:
    latents: torch.Tensor  # (T, 8, 64) float32
    meta: dict


def save_shard(path: str | Path, latents: torch.Tensor, meta: dict) -> None:
    """Write a shard atomically (temporary file + rename)."""
    check_latents(latents, path)
    torch_save_atomic({"format": FORMAT_VERSION, "latents": latents.detach().float().cpu().contiguous(),
                       "meta": dict(meta)}, path)


def load_shard(path: str | Path) -> Shard:
    """Read and validate one shard; raises DataError naming the file on any problem."""
    obj = load_tensors(path, DataError, "codicodec-flow latent shard", "; re-run `preprocess` (with --overwrite if needed)")
    if not isinstance(obj, dict) or "latents" not in obj or "meta" not in obj:
        raise DataError(f"{path}: not a codicodec-flow shard (expected keys 'latents' and 'meta')")
    check_latents(obj["latents"], path)
    return Shard(obj["latents"].float(), dict(obj["meta"]))


def read_meta(path: str | Path) -> dict | None:
    """The metadata of a shard, or None if the file is missing or unreadable."""
    try:
        return load_shard(path).meta
    except (DataError, FileNotFoundError):
        return None


def check_latents(latents, path) -> None:
    if not isinstance(latents, torch.Tensor) or latents.ndim != 3 or tuple(latents.shape[1:]) != (TOKENS_PER_CHUNK, LATENT_DIM):
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise DataError(f"{path}: latents have shape {shape}, expected (T, {TOKENS_PER_CHUNK}, {LATENT_DIM})")
    if latents.shape[0] == 0:
        raise DataError(f"{path}: shard holds no chunks")
    if not torch.isfinite(latents).all():
        raise DataError(f"{path}: latents contain NaN or inf; re-run `preprocess --overwrite`")


def find_shards(root: str | Path) -> list[Path]:
    """Every shard file below root, sorted (temporary files from interrupted writes are ignored)."""
    root = Path(root)
    return sorted(p for p in root.rglob(f"*{SHARD_SUFFIX}") if not p.name.startswith("."))


def build_manifest(root: str | Path, extra: dict | None = None) -> dict:
    """Scan the shards below root, compute latent statistics and write manifest.json atomically."""
    root = Path(root)
    paths = find_shards(root)
    if not paths:
        raise DataError(f"{root}: no latent shards found; run `codicodec-flow preprocess` first")
    total = torch.zeros(LATENT_DIM, dtype=torch.float64)
    total_sq = torch.zeros(LATENT_DIM, dtype=torch.float64)
    tokens, entries, codecs = 0, [], set()
    for path in paths:
        shard = load_shard(path)
        flat = shard.latents.reshape(-1, LATENT_DIM).double()  # (T*8, 64)
        total += flat.sum(0)
        total_sq += (flat * flat).sum(0)
        tokens += flat.shape[0]
        codecs.add((shard.meta.get("codec"), shard.meta.get("codec_version")))
        entries.append({"path": path.relative_to(root).as_posix(), "chunks": int(shard.latents.shape[0]),
                        **{k: shard.meta[k] for k in ("source", "segment", "start_s", "duration_s") if k in shard.meta}})
    if len(codecs) > 1:
        raise DataError(f"{root}: shards come from different codecs {sorted(map(str, codecs))}; "
                        f"keep one codec per folder (re-run preprocess with --overwrite)")
    mean = total / tokens
    std = (total_sq / tokens - mean * mean).clamp_min(1e-12).sqrt()
    (codec, codec_version), = codecs
    chunks = sum(e["chunks"] for e in entries)
    manifest = {
        "format": FORMAT_VERSION,
        "codec": codec,
        "codec_version": codec_version,
        "shards": entries,
        "chunks": chunks,
        "hours": chunks * CHUNK_SECONDS / 3600,
        "stats": LatentStats(mean.float(), std.float(), tokens).to_json(),
        **(extra or {}),
    }
    write_text_atomic(json.dumps(manifest, indent=1), root / MANIFEST)
    return manifest


def manifest_shard(root: str | Path, entry) -> Path:
    """The shard file a manifest entry names; DataError unless it is a relative path that stays inside root
    (a manifest must never make training read files elsewhere, through `..`, an absolute path or a link)."""
    root = Path(root)
    rel = entry.get("path") if isinstance(entry, dict) else None
    fix = f"rebuild the manifest with `codicodec-flow preprocess --finalize --out-dir {root}`"
    if not isinstance(rel, str) or not rel:
        raise DataError(f"{root / MANIFEST}: the shard entry {str(entry)[:80]} has no 'path'; {fix}")
    path = root / rel
    if Path(rel).is_absolute() or ".." in Path(rel).parts or not path.resolve().is_relative_to(root.resolve()):
        raise DataError(f"{root / MANIFEST}: the shard entry {rel!r} points outside {root}; entries must be paths "
                        f"inside the latent folder: {fix}")
    return path


def read_manifest(root: str | Path) -> dict:
    """Load manifest.json of a latent folder; raises DataError with what to do if it is absent or broken."""
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise DataError(f"{root}: latent folder does not exist; run `codicodec-flow preprocess --out-dir {root}` first")
    if not path.exists():
        raise DataError(f"{path}: missing; run `codicodec-flow preprocess --finalize --out-dir {root}` to rebuild it")
    try:
        manifest = json.loads(path.read_text())
        LatentStats.from_json(manifest["stats"])
        if not isinstance(manifest["shards"], list):
            raise ValueError("'shards' is not a list")
    except Exception as exc:
        raise DataError(f"{path}: malformed manifest ({exc}); rebuild it with `preprocess --finalize`") from None
    if not all(math.isfinite(v) for v in manifest["stats"]["std"]):
        raise DataError(f"{path}: latent statistics are not finite; rebuild with `preprocess --finalize`")
    return manifest
