"""Audio folder -> latent shards mirroring its structure, a manifest and latent statistics.

Idempotent and resumable: a file whose shards already match its size, mtime, codec and segment
length is skipped. Bad files are reported and skipped; they never stop the run. Shards are written in the
folder's storage (shards.py): the one it already holds, float32 arrays for a new folder, or the one asked for
(the folder's shards are converted to it first, without re-encoding).
"""
from __future__ import annotations

import errno
import logging
import math
import os
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ..codec import CHUNK_SAMPLES, SAMPLE_RATE, Codec, load_codec
from ..codec.audio import AUDIO_SUFFIXES, audio_info, iter_audio_blocks
from ..config import PreprocessConfig
from ..errors import AudioError, CodecError, DataError, FlowError
from ..util.devices import resolve_device
from ..util.fsutil import name_max, remove_stale_temporaries
from ..util.progress import Reporter
from .shards import (NEW_FOLDER_STORAGE, STORAGES, build_manifest, convert_folder, folder_storages, load_shard,
                     meta_path, mixed_storage_error, read_meta, remove_shard, save_shard, shard_suffix)

log = logging.getLogger(__name__)


@dataclass
class PreprocessReport:
    encoded: list[str] = field(default_factory=list)  # source files encoded in this run
    up_to_date: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    shards_written: int = 0
    seconds_encoded: float = 0.0
    manifest: dict | None = None

    @property
    def ok(self) -> bool:
        """False only when nothing at all could be encoded (or was already encoded)."""
        return bool(self.encoded or self.up_to_date)


@dataclass
class AudioScan:
    files: list[Path]  # every real audio file once, relative to the folder, sorted
    aliases: list[tuple[Path, Path]]  # (another path to one of those files, the path kept for it)


def scan_audio(in_dir: Path) -> AudioScan:
    """Audio files below in_dir (by suffix, case-insensitive), relative to it, in a stable order.

    Links to folders are followed, but each real folder is visited once (a link back up would loop for ever)
    and each real file is kept once, under a path without links where it has one (else the first in sorted
    order), so no audio is encoded twice and none can land in both training and validation. Broken links and
    link loops stay in the list, to be reported as skipped.
    """
    seen: set[tuple[int, int] | None] = set()
    found: list[tuple[bool, Path, tuple[int, int] | None]] = []  # (reached through a link, path, identity)
    linked: list[Path] = []

    def walk(top: Path, through_link: bool) -> None:
        for dirpath, dirnames, filenames in os.walk(top, followlinks=through_link):
            here = _identity(dirpath)
            if here in seen:
                dirnames[:] = []
                continue
            seen.add(here)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if not through_link:  # real folders first; folders behind links after all of them
                linked.extend(Path(dirpath) / d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))
            for name in filenames:
                if not name.startswith(".") and Path(name).suffix.lower() in AUDIO_SUFFIXES:
                    path = Path(dirpath) / name
                    found.append((through_link or path.is_symlink(), path.relative_to(in_dir), _identity(path)))

    walk(in_dir, False)
    for link in sorted(linked):
        walk(link, True)
    kept: dict[tuple[int, int], Path] = {}
    files, aliases = [], []
    for _, rel, key in sorted(found, key=lambda f: (f[0], f[1].as_posix())):
        if key is not None and key in kept:
            aliases.append((rel, kept[key]))
            continue
        if key is not None:
            kept[key] = rel
        files.append(rel)
    return AudioScan(sorted(files, key=lambda p: p.as_posix()), sorted(aliases, key=lambda a: a[0].as_posix()))


def find_audio(in_dir: Path) -> list[Path]:
    """Each real audio file below in_dir once, relative to it, sorted (see scan_audio)."""
    return scan_audio(in_dir).files


def _identity(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of what path points to; None for a broken link or a link loop."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def shard_path(out_dir: Path, rel: Path, segment: int, storage: str = NEW_FOLDER_STORAGE) -> Path:
    return out_dir / rel.parent / f"{rel.name}.{segment:04d}{shard_suffix(storage)}"


def resolve_storage(out_dir: Path, requested: str, parallel: bool = False) -> str:
    """The storage to write into out_dir: for "auto" the one its shards are in (float32 for a folder without shards);
    one that differs from the folder's converts the folder first (refused when parts run in parallel)."""
    if requested not in ("auto", *STORAGES):
        raise FlowError(f"--storage {requested!r}: choose auto, {', '.join(STORAGES)}")
    held = folder_storages(out_dir) if out_dir.is_dir() else {}
    if requested == "auto":
        if len(held) > 1:
            raise mixed_storage_error(out_dir, held)
        return next(iter(held), NEW_FOLDER_STORAGE)
    if set(held) - {requested}:
        if parallel:
            raise FlowError(f"--storage {requested}: {out_dir} already holds shards in {', '.join(sorted(held))}; "
                            f"convert it first (`codicodec-flow preprocess --convert {requested} --out-dir {out_dir}`), "
                            f"then run the parts")
        log.info(f"{out_dir}: converting its shards to {requested} (no re-encoding)")
        convert_folder(out_dir, requested, manifest=False)
    return requested


def segment_chunks(max_seconds: float) -> int:
    """Whole chunks per shard for a --max-seconds limit (at least one)."""
    return max(1, int(max_seconds * SAMPLE_RATE) // CHUNK_SAMPLES)


def run_preprocess(cfg: PreprocessConfig, plain: bool | None = None) -> PreprocessReport:
    """Encode this process's part of cfg.in_dir into cfg.out_dir; rebuild the manifest when it owns the whole."""
    in_dir, out_dir = Path(cfg.in_dir), Path(cfg.out_dir)
    if not in_dir.is_dir():
        raise FlowError(f"--in-dir {in_dir}: folder does not exist")
    if cfg.max_seconds <= 0:
        raise FlowError(f"--max-seconds must be positive, got {cfg.max_seconds}")
    if not (cfg.num_shards >= 1 and 0 <= cfg.shard_index < cfg.num_shards):
        raise FlowError(f"--shard-index {cfg.shard_index} must lie in [0, --num-shards {cfg.num_shards})")
    storage = resolve_storage(out_dir, cfg.storage, parallel=cfg.num_shards > 1)
    scan = scan_audio(in_dir)
    if not scan.files:
        raise FlowError(f"--in-dir {in_dir}: no audio files found (looked for {', '.join(sorted(AUDIO_SUFFIXES))})")
    mine = scan.files[cfg.shard_index::cfg.num_shards]
    codec = load_codec(cfg.codec, resolve_device(cfg.device), cfg.codec_ckpt, cfg.trust_codec_ckpt)
    report = PreprocessReport()
    if cfg.shard_index == 0:  # one process reports them
        report.failed += [(rel.as_posix(), f"the same file as {kept.as_posix()} (a link); encoded once")
                          for rel, kept in scan.aliases]
    stale = remove_stale_temporaries(out_dir, recursive=True)
    if stale:
        log.info(f"removed {len(stale)} temporary file(s) left in {out_dir} by an interrupted run")
    with Reporter(len(mine), f"encoding ({cfg.codec})", plain=plain) as bar:
        for rel in mine:
            note = _process_file(codec, cfg, storage, in_dir, out_dir, rel, report)
            bar.advance(f"{rel.as_posix()}: {note}")
    if cfg.num_shards == 1 and report.ok:
        report.manifest = finalize(out_dir, cfg)
    return report


def finalize(out_dir: str | Path, cfg: PreprocessConfig | None = None) -> dict:
    """Rebuild manifest.json and latent statistics from the shards present in out_dir."""
    extra = {"created_at": _now(), "preprocess": asdict(cfg) if cfg else None}
    return build_manifest(out_dir, extra)


def _process_file(codec: Codec, cfg: PreprocessConfig, storage: str, in_dir: Path, out_dir: Path, rel: Path,
                  report: PreprocessReport) -> str:
    src = in_dir / rel
    try:
        stat = src.stat()
    except OSError as exc:  # a broken link, a link loop, a file removed since the scan
        report.failed.append((rel.as_posix(), _unreadable(src, exc)))
        return f"skipped ({report.failed[-1][1]})"
    fingerprint = {"source": rel.as_posix(), "source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns,
                   "codec": codec.name, "codec_version": codec.version, "max_seconds": float(cfg.max_seconds)}
    if not cfg.overwrite and _up_to_date(out_dir, rel, fingerprint, storage):
        report.up_to_date.append(rel.as_posix())
        return "up to date"
    try:
        written, seconds = _encode_file(codec, cfg, storage, src, out_dir, rel, fingerprint)
    except (AudioError, CodecError, DataError) as exc:  # this file only: the next one may be fine
        report.failed.append((rel.as_posix(), str(exc).removeprefix(f"{src}: ")))
        return f"skipped ({report.failed[-1][1]})"
    except (RuntimeError, ValueError, MemoryError) as exc:  # codec failure on this file only
        report.failed.append((rel.as_posix(), f"encoding failed: {type(exc).__name__}: {str(exc)[:200]}"))
        return "skipped (encoding failed)"
    report.encoded.append(rel.as_posix())
    report.shards_written += written
    report.seconds_encoded += seconds
    return f"{written} shard(s), {seconds:.1f} s"


def _unreadable(src: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "a loop of symbolic links"
    if src.is_symlink() and isinstance(exc, FileNotFoundError):
        return f"a symbolic link to {os.readlink(src)}, which does not exist"
    return f"cannot be read ({exc.strerror or type(exc).__name__})"


def _up_to_date(out_dir: Path, rel: Path, fingerprint: dict, storage: str) -> bool:
    first = read_meta(shard_path(out_dir, rel, 0, storage))
    if first is None or any(first.get(k) != v for k, v in fingerprint.items()):
        return False
    n = int(first.get("n_segments", 0))
    later = [shard_path(out_dir, rel, s, storage) for s in range(1, n)]
    return n >= 1 and all(p.exists() and (storage == "pt" or meta_path(p).exists()) for p in later)


def _encode_file(codec: Codec, cfg: PreprocessConfig, storage: str, src: Path, out_dir: Path, rel: Path,
                 fingerprint: dict) -> tuple[int, float]:
    limit = name_max(out_dir)
    first = shard_path(out_dir, rel, 0, storage)
    longest = first if storage == "pt" else meta_path(first)  # an array's .json names are one byte longer
    if len(os.fsencode(longest.name)) > limit:
        raise AudioError(f"{src}: the file name is too long for its shard's name (the name plus "
                         f"'{longest.name.removeprefix(rel.name)}' must fit {limit} bytes); rename the file")
    info = audio_info(src)
    if info.frames <= 0:
        raise AudioError(f"{src}: empty file (no audio samples)")
    seg_chunks = segment_chunks(cfg.max_seconds)
    seg_samples = seg_chunks * CHUNK_SAMPLES
    n_chunks_est = info.frames_48k // CHUNK_SAMPLES
    if n_chunks_est < 1:
        raise AudioError(f"{src}: {info.seconds:.2f} s is shorter than one codec chunk "
                         f"({CHUNK_SAMPLES / SAMPLE_RATE:.3f} s)")
    n_segments = math.ceil(n_chunks_est / seg_chunks)
    created = _now()
    buffer, buffered, segment, written, seconds = [], 0, 0, 0, 0.0

    lookahead = getattr(codec, "lookahead_samples", 0)

    def flush(wave: np.ndarray, chunks: int) -> None:
        """Encode `chunks` whole chunks from the start of wave (which may run on by the codec's lookahead)."""
        nonlocal segment, written, seconds
        if chunks == 0:
            return
        latents = codec.encode(torch.from_numpy(np.ascontiguousarray(wave)))[:chunks]  # (chunks, 8, 64)
        if not torch.isfinite(latents).all():
            raise CodecError(f"{src}: the codec produced NaN or infinite latents for this file")
        meta = {**fingerprint, "segment": segment, "n_segments": n_segments,
                "start_s": segment * seg_samples / SAMPLE_RATE, "duration_s": chunks * CHUNK_SAMPLES / SAMPLE_RATE,
                "chunks": chunks, "sample_rate": SAMPLE_RATE, "source_sample_rate": info.sample_rate,
                "source_channels": info.channels, "created_at": created}
        save_shard(shard_path(out_dir, rel, segment, storage), latents, meta, storage)
        segment, written, seconds = segment + 1, written + 1, seconds + meta["duration_s"]

    for block in iter_audio_blocks(src):
        buffer.append(block)
        buffered += block.shape[1]
        if buffered >= seg_samples + lookahead:
            wave = np.concatenate(buffer, axis=1)
            while wave.shape[1] >= seg_samples + lookahead:  # a segment plus what its last chunk reads
                flush(wave[:, :seg_samples + lookahead], seg_chunks)
                wave = wave[:, seg_samples:]
            buffer, buffered = [wave], wave.shape[1]
    if buffered:
        wave = np.concatenate(buffer, axis=1)
        flush(wave, wave.shape[1] // CHUNK_SAMPLES)
    if written == 0:
        raise AudioError(f"{src}: shorter than one codec chunk after decoding")
    if segment != n_segments:  # header length was approximate (e.g. mp3): record the true count
        for s in range(segment):
            path = shard_path(out_dir, rel, s, storage)
            shard = load_shard(path)
            save_shard(path, shard.latents, {**shard.meta, "n_segments": segment}, storage)
    _remove_stale(out_dir, rel, segment, storage)
    return written, seconds


def _remove_stale(out_dir: Path, rel: Path, n_segments: int, storage: str) -> None:
    """Delete segment shards left over from an older, longer version of the same file."""
    s = n_segments
    while shard_path(out_dir, rel, s, storage).exists():
        remove_shard(shard_path(out_dir, rel, s, storage))
        s += 1


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def summary_lines(report: PreprocessReport, elapsed: float) -> list[str]:
    """What the run did, for the terminal."""
    lines = [f"encoded {len(report.encoded)} file(s) into {report.shards_written} shard(s) "
             f"({report.seconds_encoded / 60:.1f} min of audio) in {elapsed:.1f} s; "
             f"{len(report.up_to_date)} already up to date; {len(report.failed)} skipped"]
    lines += [f"  skipped {src}: {why}" for src, why in report.failed]
    if report.manifest:
        m = report.manifest
        lines.append(f"manifest: {len(m['shards'])} shard(s), {m['hours']:.2f} h usable, codec {m['codec']} {m['codec_version']}")
    return lines



def preprocess_main(cfg: PreprocessConfig, plain: bool | None = None) -> PreprocessReport:
    """run_preprocess, split across processes when launched by torchrun (each rank encodes its part)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or cfg.num_shards != 1:
        return run_preprocess(cfg, plain)
    import torch.distributed as dist
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = cfg.device
    if device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("gloo")
    try:
        part = replace(cfg, num_shards=world, shard_index=rank, device=device)
        report = run_preprocess(part, plain)
        dist.barrier()  # every rank's shards are on disk before rank 0 counts them
        if rank == 0:
            report.manifest = finalize(cfg.out_dir, cfg)
        return report
    finally:
        dist.destroy_process_group()
