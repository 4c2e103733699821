"""Latent shards -> normalised, chunk-aligned training crops and a deterministic validation set.

Segments of one source file are joined back into one sequence, so crops can cross shard borders.
The split is by file (a stable hash of the source path), so no audio is in both sets. Every
batch's randomness comes from a generator seeded by (seed, rank, step): resuming at a step
reproduces the exact crops, with no sampler state to carry.

Array shards (float32/float16 `.npy`) stay on disk: a `StoredFile` knows only its segments' paths and lengths
and reads the chunks a crop needs, so memory does not grow with the folder. `.pt` shards (the older format)
are held in memory as `LatentFile`s. Both give the same crops for the same seed.
"""
from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..codec.base import CHUNK_SECONDS, LATENT_DIM, TOKENS_PER_CHUNK
from ..errors import DataError
from ..latents import LatentStats, normalise
from .shards import ARRAY_SUFFIX, load_shard, manifest_shard, meta_path, read_manifest, read_rows


@dataclass
class LatentFile:
    """One source file's latents, held in memory."""
    source: str
    latents: torch.Tensor  # (T, 8, 64) raw codec latents

    @property
    def chunks(self) -> int:
        return self.latents.shape[0]

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Chunks [start, stop) (clipped to the file), (n, 8, 64) float32."""
        return self.latents[max(0, start):stop]

    def window(self, start: int, stop: int, source: str) -> "LatentFile":
        """Chunks [start, stop) as a file of their own, named source."""
        return LatentFile(source, self.latents[start:stop])


@dataclass(frozen=True)
class StoredFile:
    """One source file's latents left on disk: its segments' array shards, in order, read a crop at a time."""
    source: str
    paths: tuple[str, ...]  # one .npy per segment
    counts: tuple[int, ...]  # chunks per segment, as the manifest lists them
    offset: int = 0  # a window onto the joined segments: chunks [offset, offset + length) ...
    length: int = -1  # ... to their end if -1

    def __post_init__(self):
        if self.length < 0:
            object.__setattr__(self, "length", sum(self.counts) - self.offset)

    @property
    def chunks(self) -> int:
        return self.length

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Chunks [start, stop) (clipped to the file), (n, 8, 64) float32, read from the segments they lie in."""
        start, stop = self.offset + max(0, start), self.offset + min(stop, self.chunks)
        parts, first = [], 0
        for path, n in zip(self.paths, self.counts):
            a, b = max(start, first), min(stop, first + n)
            if a < b:
                parts.append(read_rows(path, n, a - first, b - first))  # (b - a, 8, 64)
            first += n
            if first >= stop:
                break
        if not parts:
            return torch.zeros(0, TOKENS_PER_CHUNK, LATENT_DIM)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @property
    def latents(self) -> torch.Tensor:
        """The whole file, read into memory."""
        return self.read(0, self.chunks)

    def window(self, start: int, stop: int, source: str) -> "StoredFile":
        """Chunks [start, stop) as a file of their own, named source (nothing is read)."""
        return StoredFile(source, self.paths, self.counts, self.offset + start, min(stop, self.chunks) - start)


@dataclass
class LatentData:
    train: list[LatentFile | StoredFile]
    val: list[LatentFile | StoredFile]
    stats: LatentStats
    codec: str
    codec_version: str
    split_note: str
    storage: str = "pt"  # the folder's: float32 | float16 (read from disk) | pt (held in memory)
    in_memory: bool = True

    def hours(self, files: list) -> float:
        return sum(f.chunks for f in files) * CHUNK_SECONDS / 3600

    def describe(self) -> str:
        where = "held in memory" if self.in_memory else "crops read from disk"
        return (f"{len(self.train)} training file(s), {self.hours(self.train):.2f} h usable; "
                f"{len(self.val)} validation file(s), {self.hours(self.val) * 60:.1f} min ({self.split_note}); "
                f"{self.storage} shards, {where}; codec {self.codec} {self.codec_version}")


def load_latents(data_dir: str | Path, val_fraction: float = 0.1, in_memory: bool = False) -> LatentData:
    """Index the shards of data_dir, grouped by source file, and split train/validation.

    Array shards are indexed from the manifest and stay on disk (unless in_memory); `.pt` shards are read whole."""
    root = Path(data_dir)
    manifest = read_manifest(root)
    if not manifest["shards"]:
        raise DataError(f"{root}/manifest.json lists no shards; run preprocess on a folder with audio")
    groups: dict[str, list] = defaultdict(list)  # source -> [(segment, latents tensor or (path, chunks))]
    for entry in manifest["shards"]:
        path = manifest_shard(root, entry)
        if not path.exists() or (path.suffix == ARRAY_SUFFIX and not meta_path(path).exists()):
            raise DataError(f"{path}: listed in manifest.json but missing; rebuild with `preprocess --finalize`")
        if path.suffix == ARRAY_SUFFIX:
            chunks = entry.get("chunks")
            if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
                raise DataError(f"{root / 'manifest.json'}: the entry {entry['path']!r} has no chunk count; "
                                f"rebuild it with `preprocess --finalize`")
            source, segment, part = entry.get("source", entry["path"]), entry.get("segment", 0), (str(path), chunks)
        else:
            shard = load_shard(path)
            source, segment, part = shard.meta.get("source", entry["path"]), shard.meta.get("segment", 0), shard.latents
        groups[str(source)].append((int(segment), part))
    files = [_join(src, [p for _, p in sorted(parts, key=lambda p: p[0])], in_memory)
             for src, parts in sorted(groups.items())]
    train, val, note = split_files(files, val_fraction)
    storage = manifest.get("storage", "pt")
    return LatentData(train, val, LatentStats.from_json(manifest["stats"]), manifest.get("codec", "?"),
                      manifest.get("codec_version", "?"), note, storage,
                      in_memory=all(isinstance(f, LatentFile) for f in files))


def _join(source: str, parts: list, in_memory: bool) -> LatentFile | StoredFile:
    """One source's segments, in order: on disk while all are arrays, else (or if asked) in memory."""
    if not in_memory and all(isinstance(p, tuple) for p in parts):
        return StoredFile(source, tuple(p[0] for p in parts), tuple(p[1] for p in parts))
    return LatentFile(source, torch.cat([read_rows(p[0], p[1], 0, p[1]) if isinstance(p, tuple) else p for p in parts]))


def split_files(files: list, val_fraction: float) -> tuple[list, list, str]:
    """Deterministic split by a hash of each source path; a single file gives its last tenth to validation."""
    if val_fraction <= 0:
        return files, [], "no validation"
    if len(files) == 1:
        f = files[0]
        cut = max(1, f.chunks - max(2, round(f.chunks * val_fraction)))
        if f.chunks < 3:
            return files, [], "no validation: one file of under 3 chunks"
        return [f.window(0, cut, f.source)], [f.window(cut, f.chunks, f.source + " (tail)")], "one file: its last part held out"
    order = sorted(files, key=lambda f: (zlib.crc32(f.source.encode()), f.source))
    n_val = min(len(files) - 1, max(1, round(len(files) * val_fraction)))
    val = sorted(order[:n_val], key=lambda f: f.source)
    train = sorted(order[n_val:], key=lambda f: f.source)
    return train, val, "split by file"


def step_generator(seed: int, rank: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator determined by (seed, rank, step, stream): the whole state of the sampler."""
    return torch.Generator().manual_seed(hash((seed, rank, step, stream)) & 0x7FFF_FFFF_FFFF_FFFF)


def random_crops(files: list, stats: LatentStats, batch: int, crop_chunks: int, generator: torch.Generator,
                 weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of chunk-aligned crops (B, crop_chunks * 8, 64), normalised, and valid flags (B, crop_chunks).

    Files are drawn in proportion to their length; a file shorter than a crop is used whole and padded.
    Only the drawn chunks are read (from disk, for files stored there). weights: `file_weights(files)`, if the
    caller keeps them (a large folder's list need not be rebuilt every step).
    """
    if not files:
        raise DataError("no training files: the latent folder is empty after the validation split")
    weights = file_weights(files) if weights is None else weights
    picks = torch.multinomial(weights, batch, replacement=True, generator=generator)
    xs, valid = [], torch.zeros(batch, crop_chunks, dtype=torch.bool)
    for b, i in enumerate(picks.tolist()):
        f, start = files[i], 0
        if f.chunks > crop_chunks:
            start = int(torch.randint(0, f.chunks - crop_chunks + 1, (1,), generator=generator))
        z = f.read(start, start + crop_chunks)  # (<= crop_chunks, 8, 64)
        xs.append(pad_chunks(z, crop_chunks))
        valid[b, : z.shape[0]] = True
    x = normalise(torch.stack(xs), stats)  # (B, n, 8, 64)
    x = x * valid[:, :, None, None]  # padding stays exactly zero
    return x.flatten(1, 2), valid  # (B, n * 8, 64), (B, n)


def file_weights(files: list) -> torch.Tensor:
    """Each file's chance to be drawn for a crop, in proportion to its length: its chunk count (F,)."""
    return torch.tensor([float(f.chunks) for f in files])


def validation_crops(files: list, stats: LatentStats, crop_chunks: int,
                     max_crops: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic non-overlapping crops of the validation files, as (x (1, L, 64), valid (1, n)) pairs."""
    out = []
    for f in files:
        for start in range(0, f.chunks, crop_chunks):
            z = f.read(start, start + crop_chunks)
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
