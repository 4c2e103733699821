"""Latent shards -> normalised, chunk-aligned training crops and a deterministic validation set.

Segments of one source file are joined back into one sequence, so crops can cross shard borders.
The split is by file (a stable hash of the source path), so no audio is in both sets. Every
batch's randomness comes from a generator seeded by (seed, rank, step): resuming at a step
reproduces the exact crops, with no sampler state to carry.
"""
from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..codec.base import CHUNK_SECONDS
from ..errors import DataError
from ..latents import LatentStats, normalise
from .shards import load_shard, manifest_shard, read_manifest


@dataclass
class LatentFile:
    source: str
    latents: torch.Tensor  # (T, 8, 64) raw codec latents

    @property
    def chunks(self) -> int:
        return self.latents.shape[0]


@dataclass
class LatentData:
    train: list[LatentFile]
    val: list[LatentFile]
    stats: LatentStats
    codec: str
    codec_version: str
    split_note: str

    def hours(self, files: list[LatentFile]) -> float:
        return sum(f.chunks for f in files) * CHUNK_SECONDS / 3600

    def describe(self) -> str:
        return (f"{len(self.train)} training file(s), {self.hours(self.train):.2f} h usable; "
                f"{len(self.val)} validation file(s), {self.hours(self.val) * 60:.1f} min ({self.split_note}); "
                f"codec {self.codec} {self.codec_version}")


def load_latents(data_dir: str | Path, val_fraction: float = 0.1) -> LatentData:
    """Read the manifest and every shard of data_dir, grouped by source file, and split train/validation."""
    root = Path(data_dir)
    manifest = read_manifest(root)
    if not manifest["shards"]:
        raise DataError(f"{root}/manifest.json lists no shards; run preprocess on a folder with audio")
    groups: dict[str, list] = defaultdict(list)
    for entry in manifest["shards"]:
        path = manifest_shard(root, entry)
        if not path.exists():
            raise DataError(f"{path}: listed in manifest.json but missing; rebuild with `preprocess --finalize`")
        shard = load_shard(path)
        groups[shard.meta.get("source", path.relative_to(root).as_posix())].append((int(shard.meta.get("segment", 0)), shard.latents))
    files = [LatentFile(src, torch.cat([z for _, z in sorted(parts, key=lambda p: p[0])]))
             for src, parts in sorted(groups.items())]
    train, val, note = split_files(files, val_fraction)
    return LatentData(train, val, LatentStats.from_json(manifest["stats"]), manifest.get("codec", "?"),
                      manifest.get("codec_version", "?"), note)


def split_files(files: list[LatentFile], val_fraction: float) -> tuple[list[LatentFile], list[LatentFile], str]:
    """Deterministic split by a hash of each source path; a single file gives its last tenth to validation."""
    if val_fraction <= 0:
        return files, [], "no validation"
    if len(files) == 1:
        f = files[0]
        cut = max(1, f.chunks - max(2, round(f.chunks * val_fraction)))
        if f.chunks < 3:
            return files, [], "no validation: one file of under 3 chunks"
        return ([LatentFile(f.source, f.latents[:cut])], [LatentFile(f.source + " (tail)", f.latents[cut:])],
                "one file: its last part held out")
    order = sorted(files, key=lambda f: (zlib.crc32(f.source.encode()), f.source))
    n_val = min(len(files) - 1, max(1, round(len(files) * val_fraction)))
    val = sorted(order[:n_val], key=lambda f: f.source)
    train = sorted(order[n_val:], key=lambda f: f.source)
    return train, val, "split by file"


def step_generator(seed: int, rank: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator determined by (seed, rank, step, stream): the whole state of the sampler."""
    return torch.Generator().manual_seed(hash((seed, rank, step, stream)) & 0x7FFF_FFFF_FFFF_FFFF)


def random_crops(files: list[LatentFile], stats: LatentStats, batch: int, crop_chunks: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of chunk-aligned crops (B, crop_chunks * 8, 64), normalised, and valid flags (B, crop_chunks).

    Files are drawn in proportion to their length; a file shorter than a crop is used whole and padded.
    """
    if not files:
        raise DataError("no training files: the latent folder is empty after the validation split")
    weights = torch.tensor([float(f.chunks) for f in files])
    picks = torch.multinomial(weights, batch, replacement=True, generator=generator)
    xs, valid = [], torch.zeros(batch, crop_chunks, dtype=torch.bool)
    for b, i in enumerate(picks.tolist()):
        z = files[i].latents
        if z.shape[0] > crop_chunks:
            start = int(torch.randint(0, z.shape[0] - crop_chunks + 1, (1,), generator=generator))
            z = z[start:start + crop_chunks]
        xs.append(pad_chunks(z, crop_chunks))
        valid[b, : z.shape[0]] = True
    x = normalise(torch.stack(xs), stats)  # (B, n, 8, 64)
    x = x * valid[:, :, None, None]  # padding stays exactly zero
    return x.flatten(1, 2), valid  # (B, n * 8, 64), (B, n)


def validation_crops(files: list[LatentFile], stats: LatentStats, crop_chunks: int,
                     max_crops: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic non-overlapping crops of the validation files, as (x (1, L, 64), valid (1, n)) pairs."""
    out = []
    for f in files:
        for start in range(0, f.chunks, crop_chunks):
            z = f.latents[start:start + crop_chunks]
            if z.shape[0] < 2 and start > 0:
                continue  # a lone trailing chunk has no context to be predicted from
            valid = torch.zeros(1, crop_chunks, dtype=torch.bool)
            valid[0, : z.shape[0]] = True
            x = normalise(pad_chunks(z, crop_chunks), stats) * valid[0, :, None, None]
            out.append((x.flatten(0, 1)[None], valid))
            if len(out) >= max_crops:
                return out
    return out


def pad_chunks(z: torch.Tensor, n: int) -> torch.Tensor:
    """Zero-pad (T, 8, 64) to (n, 8, 64)."""
    if z.shape[0] >= n:
        return z[:n]
    return torch.cat([z, z.new_zeros(n - z.shape[0], *z.shape[1:])])
