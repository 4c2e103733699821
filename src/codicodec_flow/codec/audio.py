"""Audio files in and out: any readable format and rate -> 48 kHz stereo float32, and atomic WAV writes.

Channel policy: mono is copied to both sides; with more than two channels the first two are kept
as left/right and the rest are mixed equally into both at -3 dB, then the sum is scaled by
1 / (1 + 0.7071) so a full-scale input cannot clip.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import soxr
import torch

from ..errors import AudioError
from ..util.fsutil import atomic_path
from .base import CHANNELS, SAMPLE_RATE

AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc"})
_READ_BLOCK = 1 << 18  # source frames read per block when streaming a file


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    channels: int
    frames: int  # in the source rate

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0

    @property
    def frames_48k(self) -> int:
        return int(self.frames * SAMPLE_RATE // self.sample_rate) if self.sample_rate else 0


def audio_info(path: str | Path) -> AudioInfo:
    """Header facts of an audio file; raises AudioError naming the file if it cannot be read."""
    try:
        info = sf.info(str(path))
    except Exception as exc:  # libsndfile raises several types for corrupt or unknown files
        raise AudioError(f"{path}: not a readable audio file ({_reason(exc)})") from None
    return AudioInfo(sample_rate=int(info.samplerate), channels=int(info.channels), frames=int(info.frames))


def to_stereo(block: np.ndarray) -> np.ndarray:
    """(n, C) frames -> (n, 2) by the channel policy in the module docstring."""
    c = block.shape[1]
    if c == 1:
        return np.repeat(block, 2, axis=1)
    if c == 2:
        return block
    rest = block[:, 2:].mean(axis=1, keepdims=True) * np.float32(0.70710678)
    return (block[:, :2] + rest) * np.float32(1.0 / 1.70710678)


def iter_audio_blocks(path: str | Path) -> Iterator[np.ndarray]:
    """Stream a file as (2, n) float32 blocks at 48 kHz, in bounded memory."""
    info = audio_info(path)
    if info.sample_rate <= 0 or info.channels <= 0:
        raise AudioError(f"{path}: header reports {info.sample_rate} Hz and {info.channels} channels")
    resampler = None
    if info.sample_rate != SAMPLE_RATE:
        resampler = soxr.ResampleStream(info.sample_rate, SAMPLE_RATE, CHANNELS, dtype="float32", quality="HQ")
    try:
        with sf.SoundFile(str(path)) as fh:
            read = 0
            while True:
                block = fh.read(_READ_BLOCK, dtype="float32", always_2d=True)
                if not np.isfinite(block).all():  # float files can hold them; no codec or resampler can
                    at = (read + int(np.argmin(np.isfinite(block).all(axis=1)))) / info.sample_rate
                    raise AudioError(f"{path}: the audio holds NaN or infinite samples (first at {at:.2f} s); "
                                     f"re-export it as ordinary audio")
                read += len(block)
                last = len(block) < _READ_BLOCK
                stereo = np.ascontiguousarray(to_stereo(block))
                if resampler is not None:
                    stereo = resampler.resample_chunk(stereo, last=last)
                if len(stereo):
                    yield np.ascontiguousarray(stereo.T)
                if last:
                    return
    except AudioError:
        raise
    except Exception as exc:
        raise AudioError(f"{path}: failed while decoding audio ({_reason(exc)})") from None


def read_audio(path: str | Path, max_seconds: float | None = None) -> torch.Tensor:
    """Whole file (or its first `max_seconds`) as a (2, N) float32 tensor at 48 kHz."""
    limit = None if max_seconds is None else int(max_seconds * SAMPLE_RATE)
    blocks, total = [], 0
    for block in iter_audio_blocks(path):
        blocks.append(block)
        total += block.shape[1]
        if limit is not None and total >= limit:
            break
    if not blocks:
        raise AudioError(f"{path}: the file holds no audio samples")
    wave = torch.from_numpy(np.concatenate(blocks, axis=1))
    return wave if limit is None else wave[:, :limit]


def write_wav(path: str | Path, wave: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write a (C, N) waveform as 24-bit WAV through a temporary file; returns the path."""
    path = Path(path)
    data = wave.detach().float().cpu()
    if not torch.isfinite(data).all():
        raise AudioError(f"{path}: not written: the audio holds NaN or infinite samples (the model or codec made "
                         f"them; check the sampling settings, or whether the checkpoint's training diverged)")
    data = data.clamp(-1.0, 1.0).numpy().T
    with atomic_path(path) as tmp:
        sf.write(str(tmp), data, sample_rate, subtype="PCM_24", format="WAV")
    return path


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    line = text[-1] if text else type(exc).__name__
    return re.sub(r"^Error opening '.*?': ", "", line)  # libsndfile repeats the path we already name
