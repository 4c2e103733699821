"""LiveGenerator: StreamGenerator plus what a live stream changes between chunks.

- Controls (solver, NFE, temperature, guidance, context window) are applied by `configure`.
- Noise comes from a NoiseSource, so a seed change can crossfade instead of cutting.
- Steering: the finished normalised chunk x0 (B, 8, 64) is scaled and shifted per token and per
  channel before it becomes context and is returned, so the model hears its own steered output as
  context and the steering feeds back into what comes next, as a musician's would.
- `next_chunk(as_context=False)` leaves the cache alone: with a live input the performer's real
  audio, not the model's guess, fills that moment of the context (`add_context_latents`).
- A chunk can be drafted, checked and only then committed (`draft`, `latents`, `commit`): a draft that
  went wrong (NaN, inf) is dropped and drawn again with the noise that follows, and never reaches the
  cache; `skip` moves the noise on for a chunk that was given up.
- Lookahead (realtime/lookahead.py): the model's own chunks are committed as context (its guesses of what the
  performer plays next), then `rewind` takes them back when the real chunk arrives, and `add_noised_context`
  puts the guesses still ahead back exactly as they were.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..generate import StreamGenerator
from ..latents import normalise
from ..util.devices import to_device
from .noise import NoiseSource
from .state import Controls


class LiveGenerator(StreamGenerator):
    """A StreamGenerator whose controls, seed and steering may change between chunks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise = NoiseSource(self.cfg.seed)
        self.controls: Controls | None = None
        self._steer: tuple[torch.Tensor, torch.Tensor] | None = None  # (scale, bias), each (8, 64)

    def _noise(self) -> torch.Tensor:
        return to_device(self.noise.draw((self.batch, self.tokens, self.model.cfg.latent_dim)), self.device)

    @property
    def noise_generator(self) -> torch.Generator:
        return self.noise.generator

    def configure(self, c: Controls, seed_mode: str = "crossfade", crossfade_chunks: int = 4) -> None:
        """Run the following chunks with controls c; a changed seed cuts or crossfades."""
        prev = self.controls
        self.cfg = replace(self.cfg, solver=c.solver, nfe=c.nfe, temperature=c.temperature, cfg_scale=c.cfg_scale,
                           seed=c.seed)
        self.steps = c.steps
        self.cache.set_active(c.context_chunks)
        if c.seed != self.noise.seed:  # the first configure may also bring a seed: nothing to fade from yet
            fade = prev is not None and seed_mode == "crossfade"
            self.noise.reseed(c.seed, crossfade_chunks if fade else 0)
        if c.steered:
            ts, tb = torch.tensor(c.token_scale), torch.tensor(c.token_bias)  # (8,)
            cs, cb = torch.tensor(c.channel_scale), torch.tensor(c.channel_bias)  # (64,)
            self._steer = ((ts[:, None] * cs[None, :]).to(self.device),  # (8, 64)
                           (tb[:, None] + cb[None, :]).to(self.device))  # (8, 64)
        else:
            self._steer = None
        self.controls = c

    @torch.inference_mode()
    def add_context_latents(self, latents: torch.Tensor) -> None:
        """Make raw codec latents (8, 64) or (B, 8, 64), e.g. an encoded live input chunk, the next context: real
        music, not the model's own (a model with the own-chunk mark tells them apart)."""
        if latents.ndim == 2:
            latents = latents.expand(self.batch, *latents.shape)
        self.add_context(normalise(latents.float().cpu(), self.stats).to(self.device), own=False)  # (B, 8, 64)

    def shape_output(self, x0: torch.Tensor) -> torch.Tensor:
        if self._steer is None:
            return x0
        scale, bias = self._steer
        return x0 * scale + bias  # (B, 8, 64), broadcast over the batch

    def _chunk_done(self) -> None:
        self.noise.advance()

    @torch.inference_mode()
    def draft(self) -> torch.Tensor:
        """A candidate next chunk, normalised and steered (B, 8, 64); nothing is kept until commit()."""
        x1 = self.cfg.temperature * self._noise()  # (B, 8, 64)
        self.last_noise = x1
        return self.shape_output(self.solve(x1))

    @torch.inference_mode()
    def commit(self, x0: torch.Tensor, as_context: bool = True) -> torch.Tensor | None:
        """Keep a draft: it becomes context (unless as_context=False) and the noise moves on to the next chunk.
        Returns the draft as it went into the context (re-noised), for add_noised_context after a rewind."""
        ctx = self.add_context(x0) if as_context else None
        self.skip()
        return ctx

    def skip(self) -> None:
        """Move on one chunk without keeping one (recovery gave this chunk up)."""
        self._chunk_done()
        self.chunks_done += 1

    def next_chunk(self, as_context: bool = True) -> torch.Tensor:
        """StreamGenerator.next_chunk, as draft + commit."""
        x0 = self.draft()
        self.commit(x0, as_context)
        return self.latents(x0)
