"""LiveGenerator: StreamGenerator plus what a live stream changes between chunks.

- Controls (solver, NFE, temperature, guidance, context window) are applied by `configure`.
- Noise comes from a NoiseSource, so a seed change can crossfade instead of cutting.
- Steering: the finished normalised chunk x0 (B, 8, 64) is scaled and shifted per token and per
  channel before it is committed and returned, so the model hears its own steered output as
  context and the steering feeds back into what comes next, as a musician's would.
- `next_chunk(commit=False)` leaves the cache alone: with a live input the performer's real audio,
  not the model's guess, fills that moment of the context (`commit_latents`).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..data import denormalise, normalise
from ..solvers import integrate
from ..generate import StreamGenerator
from .noise import NoiseSource
from .state import Controls


class LiveGenerator(StreamGenerator):
    """A StreamGenerator whose controls, seed and steering may change between chunks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise = NoiseSource(self.cfg.seed)
        self.controls: Controls | None = None
        self._steer: tuple[torch.Tensor, torch.Tensor] | None = None  # (scale, bias), each (8, 64)
        self.last_noise: torch.Tensor | None = None  # x(1) of the latest chunk, (B, 8, 64); tests read it

    def _noise(self) -> torch.Tensor:
        return self.noise.draw((self.batch, self.tokens, self.model.cfg.latent_dim)).to(self.device)

    def configure(self, c: Controls, seed_mode: str = "crossfade", crossfade_chunks: int = 4) -> None:
        """Run the following chunks with controls c; a changed seed cuts or crossfades."""
        prev = self.controls
        self.cfg = replace(self.cfg, solver=c.solver, nfe=c.evals, n_steps=c.steps, temperature=c.temperature,
                           cfg_scale=c.cfg_scale, seed=c.seed)
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
    def commit_latents(self, latents: torch.Tensor) -> None:
        """Make raw codec latents (8, 64) or (B, 8, 64), e.g. an encoded live input chunk, the next context."""
        if latents.ndim == 2:
            latents = latents.expand(self.batch, *latents.shape)
        self.commit(normalise(latents.float().cpu(), self.stats).to(self.device))  # (B, 8, 64)

    @torch.inference_mode()
    def next_chunk(self, commit: bool = True) -> torch.Tensor:
        """Generate (and by default commit) the next chunk; raw codec latents (B, 8, 64) on the CPU."""
        x1 = self.cfg.temperature * self._noise()  # (B, 8, 64)
        self.last_noise = x1
        x0 = integrate(self.velocity, x1, self.cfg.solver, self.steps, self.cfg.schedule, self.cfg.schedule_shift,
                       self.noise.generator, noise_scale=self.cfg.temperature)
        if self._steer is not None:
            scale, bias = self._steer
            x0 = x0 * scale + bias  # (B, 8, 64), broadcast over the batch
        if commit:
            self.commit(x0)
        self.noise.advance()
        self.chunks_done += 1
        return denormalise(x0.float(), self.stats).cpu()
