"""Between audio files and a model's latents: encode a prompt file, decode generated latents, open the right codec."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import AudioError, FlowError
from . import CHUNK_SAMPLES, CHUNK_SECONDS, SAMPLE_RATE, Codec, load_codec
from .audio import read_audio

log = logging.getLogger(__name__)
DECODE_MODES = ("parallel", "stream")


def open_codec(name: str, version: str, device, codec_ckpt: str | Path | None = None, trust: bool = False,
               trained_on: str = "the checkpoint") -> Codec:
    """The codec a model was trained with (`name`, `version` from its checkpoint); a version change is noted."""
    codec = load_codec(name, device, codec_ckpt, trust)
    if codec.version != version:
        log.warning(f"{trained_on} was trained on {name} {version} latents; this codec is {codec.version}")
    return codec


def encode_prompt(codec: Codec, path: str | Path) -> torch.Tensor:
    """A prompt file -> its whole chunks as latents (T, 8, 64); shorter than one chunk is an error."""
    wave = read_audio(path)
    chunks = wave.shape[1] // CHUNK_SAMPLES
    if chunks < 1:
        raise AudioError(f"{path}: the prompt is {wave.shape[1] / SAMPLE_RATE:.2f} s long; it must hold at least one "
                         f"codec chunk ({CHUNK_SECONDS:.3f} s)")
    return codec.encode(wave[:, : chunks * CHUNK_SAMPLES])


def decode_latents(codec: Codec, latents: torch.Tensor, mode: str) -> torch.Tensor:
    """(T, 8, 64) -> (2, T * 32768) with the codec's parallel decoder or its streaming decode_next."""
    if mode == "parallel":
        return codec.decode(latents)
    if mode != "stream":
        raise FlowError(f"unknown --decode {mode!r}: choose one of {', '.join(DECODE_MODES)}")
    codec.reset()
    return torch.cat([codec.decode_next(z) for z in latents], dim=1)
