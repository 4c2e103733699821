"""Codec backends: `codicodec` (the real CoDiCodec) and `spectral` (built in, offline)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CodecError
from .base import (CHANNELS, CHUNK_SAMPLES, CHUNK_SECONDS, LATENT_DIM, SAMPLE_RATE, TOKEN_SAMPLES,
                   TOKENS_PER_CHUNK, Codec, chunks_for)

CODEC_NAMES = ("codicodec", "spectral")

__all__ = ["CHANNELS", "CHUNK_SAMPLES", "CHUNK_SECONDS", "CODEC_NAMES", "Codec", "LATENT_DIM",
           "SAMPLE_RATE", "TOKENS_PER_CHUNK", "TOKEN_SAMPLES", "chunks_for", "load_codec", "local_codec"]


def local_codec() -> tuple[str, str]:
    """The best codec usable on this machine without a download: codicodec if its weights are here, else spectral; and why."""
    try:
        from .codicodec import installed_weights
        weights = installed_weights()
    except Exception:  # the package is missing or broken: the built-in codec still works
        weights = None
    if weights is not None:
        return "codicodec", f"CoDiCodec weights found at {weights}"
    return "spectral", ("no CoDiCodec weights on this machine (set CODICODEC_CKPT to use them), so the built-in "
                        "spectral codec stands in: expect rhythm and spectral envelope, not pitch or timbre")


def load_codec(name: str, device: torch.device | str = "cpu", ckpt: str | Path | None = None,
               trust_pickle: bool = False) -> Codec:
    """Build the codec backend called `name` on `device` (`ckpt`, `trust_pickle` only matter for codicodec)."""
    device = torch.device(device)
    if name == "spectral":
        from .spectral import SpectralCodec
        return SpectralCodec(device=device)
    if name == "codicodec":
        from .codicodec import CoDiCodec
        return CoDiCodec(device=device, ckpt=ckpt, trust_pickle=trust_pickle)
    raise CodecError(f"unknown codec {name!r}: choose one of {', '.join(CODEC_NAMES)}")
