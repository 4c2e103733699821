"""The codec interface the rest of the package talks to, and the geometry every backend shares."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

SAMPLE_RATE = 48_000  # Hz
CHANNELS = 2  # stereo
CHUNK_SAMPLES = 32_768  # audio samples per codec chunk (~0.683 s)
TOKENS_PER_CHUNK = 8  # latent tokens per chunk
LATENT_DIM = 64  # channels per latent token
TOKEN_SAMPLES = CHUNK_SAMPLES // TOKENS_PER_CHUNK  # 4096 samples (~85 ms) per token
CHUNK_SECONDS = CHUNK_SAMPLES / SAMPLE_RATE


@runtime_checkable
class Codec(Protocol):
    """Waveform <-> latent codec with CoDiCodec's geometry and a streaming decoder.

    Waveforms are float32 tensors shaped (2, N) at 48 kHz; latents are (T, 8, 64).
    """

    name: str  # backend name stored in shards and checkpoints ("codicodec", "spectral")
    version: str  # backend version: latents from different versions are not interchangeable
    device: torch.device
    lookahead_samples: int  # samples past a chunk's end that its encoding reads (segment encoders pass them)

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """(2, N) waveform -> (ceil(N / 32768), 8, 64) latents; the last chunk is zero-padded."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(T, 8, 64) latents -> (2, T * 32768) waveform."""
        ...

    def reset(self) -> None:
        """Forget the streaming decoder's past; the next decode_next starts a new stream."""
        ...

    def decode_next(self, chunk: torch.Tensor) -> torch.Tensor:
        """(8, 64) latents of the next chunk -> (2, 32768) waveform continuing the stream."""
        ...


def chunks_for(n_samples: int) -> int:
    """Number of whole codec chunks in n_samples of 48 kHz audio."""
    return n_samples // CHUNK_SAMPLES
