"""Noise streams for live seed changes: a hard cut, or a variance-preserving crossfade between two seeds.

Each chunk starts its ODE from noise. A crossfade over n chunks draws from both the old and the
new stream and blends them as cos(a) * eps_old + sin(a) * eps_new, with a rising from 0 to pi/2
(chunk i of n uses a = i / n * pi / 2). Two independent unit-Gaussian draws blended with
cos^2 + sin^2 = 1 are again unit Gaussian, so the noise the model sees never changes level: the
music drifts from where the old seed was going to where the new one goes, with no dip in energy.
Both streams are drawn in lockstep, so the new seed's stream is exactly where a hard cut at the
same moment would have put it once the crossfade ends. A crossfade started during another one
blends from the current blend (which keeps finishing underneath), so a fast run of seed changes
never jumps either. All noise is drawn on the CPU, as in generate.py: the same seed gives the same
noise on every device.
"""
from __future__ import annotations

import math

import torch


class SeedStream:
    """Gaussian noise from one seed."""

    def __init__(self, seed: int):
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator)

    def advance(self) -> "SeedStream":
        return self

    @property
    def newest(self) -> "SeedStream":
        return self


class Crossfade:
    """cos(a) * old + sin(a) * new, a stepping from 0 to pi/2 over `chunks` chunks."""

    def __init__(self, old: "SeedStream | Crossfade", new: SeedStream, chunks: int):
        if chunks < 1:
            raise ValueError(f"a crossfade needs at least 1 chunk, got {chunks}")
        self.old, self.new, self.chunks, self.i = old, new, chunks, 1  # i: the chunk being drawn, 1..chunks

    @property
    def angle(self) -> float:
        return self.i / self.chunks * math.pi / 2

    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        a = self.angle
        return math.cos(a) * self.old.draw(shape) + math.sin(a) * self.new.draw(shape)

    def advance(self) -> "SeedStream | Crossfade":
        """Move to the next chunk; once the blend is all `new`, hand `new` back in our place."""
        self.old = self.old.advance()
        self.i += 1
        return self.new if self.i > self.chunks else self

    @property
    def newest(self) -> SeedStream:
        return self.new


class NoiseSource:
    """The generator's noise: one seed, or a crossfade in progress. Call advance() once per chunk."""

    def __init__(self, seed: int):
        self.stream: SeedStream | Crossfade = SeedStream(seed)

    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.stream.draw(shape)

    def advance(self) -> None:
        self.stream = self.stream.advance()

    def reseed(self, seed: int, crossfade_chunks: int = 0) -> None:
        """Switch to `seed`: at once (0 chunks: a hard cut), or blended over crossfade_chunks chunks."""
        new = SeedStream(seed)
        self.stream = new if crossfade_chunks < 1 else Crossfade(self.stream, new, crossfade_chunks)

    @property
    def generator(self) -> torch.Generator:
        """The newest stream's generator, for what a stochastic solver re-injects inside a chunk."""
        return self.stream.newest.generator

    @property
    def seed(self) -> int:
        return self.stream.newest.seed

    @property
    def crossfade(self) -> tuple[int, int] | None:
        """(chunk i, of n) of the outermost crossfade in progress, or None."""
        s = self.stream
        return (s.i, s.chunks) if isinstance(s, Crossfade) else None
