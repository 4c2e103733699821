"""The latent shard format: one shard per audio file (or segment), a manifest, and latent statistics.

A shard holds the latents (T, 8, 64) of one file or segment and its metadata, in one of three storages:
- "float32" / "float16": `NAME.npy`, a plain little-endian array (T, 8, 64), and `NAME.json` beside it,
  {"format": 2, "storage", "shape", "meta"}. Training memory-maps the array and reads only the crops it draws,
  so its memory does not grow with the folder. The array is written first, the JSON last (each atomically):
  an array without its JSON is an interrupted write and is ignored.
- "pt" (the format before version 2, still read and written): `NAME.pt`, a dict
  `{"latents": float32 (T, 8, 64), "meta": {...}}` saved with torch.save; training holds these in memory.
Neither can run code when opened: arrays are read with `allow_pickle=False`, `.pt` files with
`torch.load(weights_only=True)`. A folder holds one storage; `convert_folder` turns it into another in place.
`manifest.json` lists every shard with its metadata, the storage, the codec that made them and the per-channel
latent mean/std over all tokens (training bakes these into checkpoints).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..codec.base import CHUNK_SECONDS, LATENT_DIM, TOKENS_PER_CHUNK
from ..errors import DataError
from ..latents import LatentStats
from ..util.fsutil import atomic_path, load_tensors, torch_save_atomic, write_text_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARD_SUFFIX = ".pt"  # the "pt" storage
ARRAY_SUFFIX, META_SUFFIX = ".npy", ".json"  # the "float32" and "float16" storages
FORMAT_VERSION = 1  # of a .pt shard
ARRAY_FORMAT = 2  # of an .npy + .json shard
STORAGES = ("float32", "float16", "pt")
NEW_FOLDER_STORAGE = "float32"  # what preprocess writes into a folder without shards (--storage auto)
_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
FLOAT16_MAX = 65504.0


def shard_suffix(storage: str) -> str:
    """The suffix of a shard file in a storage: .pt or .npy."""
    return SHARD_SUFFIX if storage == "pt" else ARRAY_SUFFIX


def meta_path(path: str | Path) -> Path:
    """The JSON beside an .npy shard."""
    return Path(path).with_suffix(META_SUFFIX)


@dataclass
class Shard:
    latents: torch.Tensor  # (T, 8, 64) float32
    meta: dict


def save_shard(path: str | Path, latents: torch.Tensor, meta: dict, storage: str | None = None) -> None:
    """Write a shard atomically: a .pt path in the "pt" storage, an .npy path (and its .json) in float32 (default)
    or float16. float16 refuses latents beyond its range (|x| > 65504) rather than store infinities."""
    path = Path(path)
    check_latents(latents, path)
    if path.suffix != ARRAY_SUFFIX:
        if storage not in (None, "pt"):
            raise ValueError(f"{path}: a {storage} shard is an {ARRAY_SUFFIX} file")
        torch_save_atomic({"format": FORMAT_VERSION, "latents": latents.detach().float().cpu().contiguous(),
                           "meta": dict(meta)}, path)
        return
    storage = storage or "float32"
    if storage not in _DTYPES:
        raise ValueError(f"{path}: an {ARRAY_SUFFIX} shard is float32 or float16, not {storage}")
    peak = float(latents.detach().abs().max())
    if storage == "float16" and peak > FLOAT16_MAX:
        raise DataError(f"{path}: latents reach {peak:g}, beyond float16's range (+-{FLOAT16_MAX:g}); "
                        f"store this folder with --storage float32")
    array = latents.detach().float().cpu().numpy().astype(_DTYPES[storage])  # (T, 8, 64)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.lib.format.write_array(fh, array, allow_pickle=False)
    info = {"format": ARRAY_FORMAT, "storage": storage, "shape": list(array.shape), "meta": dict(meta)}
    write_text_atomic(json.dumps(info), meta_path(path))  # last: its presence marks a finished shard


def open_array(path: str | Path, chunks: int | None = None) -> np.ndarray:
    """Memory-map the array of an .npy shard (read-only; nothing is read until used), checking its shape, type and,
    when given, its chunk count; raises DataError naming the file."""
    fix = "; re-run `preprocess` (with --overwrite if needed)"
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: shard missing; rebuild the manifest with `preprocess --finalize`") from None
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable latent array ({type(exc).__name__}: {str(exc)[:120]}){fix}") from None
    if array.dtype not in (np.dtype("<f4"), np.dtype("<f2")):
        raise DataError(f"{path}: holds {array.dtype} values, expected float32 or float16{fix}")
    if array.ndim != 3 or array.shape[1:] != (TOKENS_PER_CHUNK, LATENT_DIM) or array.shape[0] == 0:
        raise DataError(f"{path}: latents have shape {array.shape}, expected (T, {TOKENS_PER_CHUNK}, {LATENT_DIM}){fix}")
    if chunks is not None and array.shape[0] != chunks:
        raise DataError(f"{path}: holds {array.shape[0]} chunks, manifest.json says {chunks} (re-encoded since?); "
                        f"rebuild the manifest with `preprocess --finalize`")
    return array


def read_rows(path: str | Path, chunks: int, start: int, stop: int) -> torch.Tensor:
    """Chunks [start, stop) of an .npy shard of `chunks` chunks, as float32 (stop - start, 8, 64): only these are read,
    and the mapping is gone when this returns (the pages stay in the shared page cache, not in this process)."""
    rows = np.array(open_array(path, chunks)[start:stop], dtype=np.float32)
    if not np.isfinite(rows).all():
        raise DataError(f"{path}: latents contain NaN or inf; re-run `preprocess --overwrite`")
    return torch.from_numpy(rows)


def _read_info(path: Path) -> dict:
    """The JSON of an .npy shard, checked."""
    where = meta_path(path)
    try:
        info = json.loads(where.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: its metadata {where.name} is missing (an interrupted write?); "
                        f"re-run `preprocess`") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{where}: unreadable shard metadata ({type(exc).__name__}); re-run `preprocess --overwrite`") from None
    if not isinstance(info, dict) or not isinstance(info.get("meta"), dict):
        raise DataError(f"{where}: not the metadata of a codicodec-flow shard; re-run `preprocess --overwrite`")
    return info


def load_shard(path: str | Path) -> Shard:
    """Read and validate one whole shard (any storage) as float32; raises DataError naming the file on any problem."""
    path = Path(path)
    if path.suffix == ARRAY_SUFFIX:
        info = _read_info(path)
        array = open_array(path)
        if list(array.shape) != info.get("shape"):
            raise DataError(f"{path}: the array has shape {array.shape} but {meta_path(path).name} says "
                            f"{info.get('shape')} (an interrupted write?); re-run `preprocess --overwrite`")
        latents = torch.from_numpy(np.array(array, dtype=np.float32))
        check_latents(latents, path)
        return Shard(latents, info["meta"])
    obj = load_tensors(path, DataError, "codicodec-flow latent shard", "; re-run `preprocess` (with --overwrite if needed)")
    if not isinstance(obj, dict) or "latents" not in obj or "meta" not in obj:
        raise DataError(f"{path}: not a codicodec-flow shard (expected keys 'latents' and 'meta')")
    check_latents(obj["latents"], path)
    return Shard(obj["latents"].float(), dict(obj["meta"]))


def read_meta(path: str | Path) -> dict | None:
    """The metadata of a shard (for an .npy shard its JSON alone is read), or None if missing or unreadable."""
    path = Path(path)
    try:
        if path.suffix == ARRAY_SUFFIX:
            return _read_info(path)["meta"] if path.exists() else None
        return load_shard(path).meta
    except (DataError, FileNotFoundError):
        return None


def shard_storage(path: str | Path) -> str:
    """The storage a shard file is in: "pt", or the type of its array ("float32", "float16")."""
    path = Path(path)
    if path.suffix != ARRAY_SUFFIX:
        return "pt"
    return "float16" if open_array(path).dtype.itemsize == 2 else "float32"


def remove_shard(path: str | Path) -> None:
    """Delete a shard: a .pt file, or an .npy and its .json (the JSON first, so no finished-looking half is left)."""
    path = Path(path)
    if path.suffix == ARRAY_SUFFIX:
        meta_path(path).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def check_latents(latents, path) -> None:
    if not isinstance(latents, torch.Tensor) or latents.ndim != 3 or tuple(latents.shape[1:]) != (TOKENS_PER_CHUNK, LATENT_DIM):
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise DataError(f"{path}: latents have shape {shape}, expected (T, {TOKENS_PER_CHUNK}, {LATENT_DIM})")
    if latents.shape[0] == 0:
        raise DataError(f"{path}: shard holds no chunks")
    if not torch.isfinite(latents).all():
        raise DataError(f"{path}: latents contain NaN or inf; re-run `preprocess --overwrite`")


def find_shards(root: str | Path) -> list[Path]:
    """Every finished shard file below root (.pt, and .npy with its .json), sorted; temporary files from interrupted
    writes, and arrays whose JSON was never written, are ignored."""
    root = Path(root)
    found = [p for p in root.rglob(f"*{SHARD_SUFFIX}") if not p.name.startswith(".")]
    found += [p for p in root.rglob(f"*{ARRAY_SUFFIX}") if not p.name.startswith(".") and meta_path(p).exists()]
    return sorted(found)


def folder_storages(root: str | Path) -> dict[str, int]:
    """How many shards below root are in each storage ({} for a folder without shards)."""
    counts: dict[str, int] = {}
    for path in find_shards(root):
        kind = shard_storage(path)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def mixed_storage_error(root: Path, counts: dict[str, int]) -> DataError:
    held = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    return DataError(f"{root}: shards in more than one storage ({held}), e.g. from an interrupted conversion; "
                     f"make them one with `codicodec-flow preprocess --convert STORAGE --out-dir {root}` "
                     f"(STORAGE: {' | '.join(STORAGES)})")


def build_manifest(root: str | Path, extra: dict | None = None) -> dict:
    """Scan the shards below root, compute latent statistics and write manifest.json atomically."""
    root = Path(root)
    paths = find_shards(root)
    if not paths:
        raise DataError(f"{root}: no latent shards found; run `codicodec-flow preprocess` first")
    total = torch.zeros(LATENT_DIM, dtype=torch.float64)
    total_sq = torch.zeros(LATENT_DIM, dtype=torch.float64)
    tokens, entries, codecs, storages = 0, [], set(), {}
    for path in paths:
        shard = load_shard(path)
        kind = shard_storage(path)
        storages[kind] = storages.get(kind, 0) + 1
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
    if len(storages) > 1:
        raise mixed_storage_error(root, storages)
    mean = total / tokens
    std = (total_sq / tokens - mean * mean).clamp_min(1e-12).sqrt()
    (codec, codec_version), = codecs
    (storage,) = storages
    chunks = sum(e["chunks"] for e in entries)
    manifest = {
        "format": FORMAT_VERSION if storage == "pt" else ARRAY_FORMAT,
        "storage": storage,
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


@dataclass
class ConvertReport:
    converted: int  # shards rewritten in the new storage
    kept: int  # shards already in it
    manifest: dict | None


def convert_folder(root: str | Path, storage: str, extra: dict | None = None, manifest: bool = True) -> ConvertReport:
    """Rewrite every shard below root in `storage` (no re-encoding), then rebuild the manifest (unless told not to).

    Each shard is written anew (atomically) before its old file is removed, so a killed run loses nothing and
    running it again finishes the job. float16 rounds each value to 11 significant bits (README, preprocess)."""
    root = Path(root)
    if storage not in STORAGES:
        raise DataError(f"unknown storage {storage!r}: choose one of {', '.join(STORAGES)}")
    paths = find_shards(root)
    if not paths:
        raise DataError(f"{root}: no latent shards found; run `codicodec-flow preprocess` first")
    converted = kept = 0
    for path in paths:
        if not path.exists():  # removed since the scan
            continue
        if shard_storage(path) == storage:
            kept += 1
            continue
        shard = load_shard(path)
        target = path.with_suffix(shard_suffix(storage))
        save_shard(target, shard.latents, shard.meta, storage)
        if target != path:
            remove_shard(path)
        converted += 1
    log.info(f"{root}: {converted} shard(s) converted to {storage}, {kept} already {storage}")
    if not manifest:
        return ConvertReport(converted, kept, None)
    try:  # keep the record of how the shards were made
        before = json.loads((root / MANIFEST).read_text())
        kept_record = {k: before[k] for k in ("created_at", "preprocess") if k in before}
    except (OSError, ValueError, TypeError):
        kept_record = {}
    return ConvertReport(converted, kept, build_manifest(root, {**kept_record, **(extra or {})}))


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
