"""Latent statistics and normalisation: the model works on per-channel standardised codec latents.

`preprocess` measures the per-channel mean and std of a latent folder; training bakes them into
every checkpoint, and generation maps the model's output back to the codec's own scale with them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .codec.base import LATENT_DIM


@dataclass(frozen=True)
class LatentStats:
    mean: torch.Tensor  # (64,)
    std: torch.Tensor  # (64,)
    tokens: int  # how many tokens they were measured over

    @staticmethod
    def identity() -> "LatentStats":
        """Mean 0, std 1: latents taken as they are (benchmarks and checks with random weights)."""
        return LatentStats(torch.zeros(LATENT_DIM), torch.ones(LATENT_DIM), 1)

    def to_json(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "tokens": self.tokens}

    @staticmethod
    def from_json(d: dict) -> "LatentStats":
        return LatentStats(torch.tensor(d["mean"], dtype=torch.float32), torch.tensor(d["std"], dtype=torch.float32),
                           int(d["tokens"]))


def normalise(z: torch.Tensor, stats: LatentStats) -> torch.Tensor:
    """Codec latents (..., 64) -> the model's unit-scale space."""
    return (z - stats.mean.to(z.device)) / stats.std.to(z.device)


def denormalise(z: torch.Tensor, stats: LatentStats) -> torch.Tensor:
    """The model's space (..., 64) -> codec latents."""
    return z * stats.std.to(z.device) + stats.mean.to(z.device)
