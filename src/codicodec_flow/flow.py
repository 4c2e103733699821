"""The probability path and the training objective.

Convention, used everywhere in this package (rectified flow):
    x_t = (1 - t) * x + t * eps,   t = 1 is noise, t = 0 is data,   target velocity v = eps - x.
Time is per token (B, L); within a chunk all 8 tokens share one time.

Training runs two streams of the same crop in one forward pass: a clean stream (each chunk
lightly noised to its context-noise level s) and a noisy stream (each chunk at its own t). Under
the two-stream layout (streams.py), noisy chunk i sees exactly what generation gives it: the clean
chunks i-W..i-1 and itself. So every chunk of every crop is trained in the generation setting.
`noisy_chunks` keeps only some chunks in the noisy stream: the clean stream is whole, so each kept
chunk still sees its full context, and the step costs less (train --noisy-chunks).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .config import FlowConfig
from .model import FlowDiT
from .streams import TwoStreams


def interpolate(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t for data x, noise eps (B, L, D) and per-token time t (B, L)."""
    t = t[..., None].to(x.dtype)
    return (1 - t) * x + t * eps


def target_velocity(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x


def sample_times(shape, cfg: FlowConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-chunk times in (0, 1): logit-normal (mass in the middle) or uniform."""
    if cfg.t_dist == "uniform":
        return torch.rand(shape, generator=generator)
    return torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(shape, generator=generator))


def per_token(t_chunks: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """(B, n) per-chunk values -> (B, n * 8) per-token values."""
    return t_chunks.repeat_interleave(chunk_tokens, dim=1)


@dataclass
class FlowBatch:
    """Everything one two-stream forward needs; built on the CPU so noise is device-independent.

    The noisy stream holds K chunks of the crop's n: all of them (K = n) unless make_batch's noisy_chunks says fewer.
    """
    inputs: torch.Tensor  # (B, L + K * 8, D): clean stream then noisy stream
    times: torch.Tensor  # (B, L + K * 8)
    target: torch.Tensor  # (B, K * 8, D) velocity for the noisy stream
    t: torch.Tensor  # (B, K) the noisy chunks' times
    streams: TwoStreams  # the layout: who sees whom (valid, unconditional and kept chunks)
    pos: torch.Tensor  # (L + K * 8,) CPU positions
    own: torch.Tensor | None = None  # (B, L + K * 8) True on clean-stream tokens the model generated itself (rollouts)

    @property
    def valid(self) -> torch.Tensor:
        """(B, n) chunks of the crop that hold data (not padding)."""
        return self.streams.valid

    @property
    def target_valid(self) -> torch.Tensor:
        """(B, K) whether each noisy-stream chunk holds data."""
        return self.valid if self.streams.kept is None else self.valid[:, self.streams.kept.to(self.valid.device)]

    @property
    def mask(self) -> torch.Tensor:
        """The dense (B, 1, L + K * 8, L + K * 8) attention mask of the layout: what the model's fast path equals."""
        return self.streams.mask()

    def to(self, device) -> "FlowBatch":
        move = lambda x: x.to(device, non_blocking=True)  # noqa: E731
        return FlowBatch(move(self.inputs), move(self.times), move(self.target), move(self.t), self.streams.to(device),
                         self.pos, None if self.own is None else move(self.own))


def make_batch(x: torch.Tensor, valid: torch.Tensor, t: torch.Tensor, s: torch.Tensor, uncond: torch.Tensor,
               window: int, chunk_tokens: int, generator: torch.Generator | None = None,
               context: torch.Tensor | None = None, noisy_chunks: int | None = None,
               own_from: int | None = None) -> FlowBatch:
    """Two-stream inputs for clean crops x (B, L, D) with per-chunk noisy times t, context noise s, uncond flags.

    `context` (B, L, D), if given, fills the clean stream instead of x (rollout.py: the model's own chunks as
    the past); the noisy stream and its targets stay the real x. `own_from`: the context's chunks from this one on
    are the model's own, which the batch marks (FlowBatch.own; a model with cfg.mark_own sees the mark).
    `noisy_chunks` K < n: the noisy stream keeps K chunks drawn at random (the same for every crop of the batch),
    drawn after the noise, so the kept chunks get exactly the inputs and targets of the full batch.
    """
    B, L, _ = x.shape
    n = L // chunk_tokens
    eps = torch.randn(x.shape, generator=generator)
    eps_ctx = torch.randn(x.shape, generator=generator)
    s_tok = per_token(s, chunk_tokens)  # (B, L)
    clean = interpolate(x if context is None else context, eps_ctx, s_tok)  # (B, L, D)
    kept = None
    if noisy_chunks is not None and noisy_chunks < n:
        kept = torch.randperm(n, generator=generator)[:noisy_chunks].sort().values  # (K,)
        x, eps = (a.reshape(B, n, chunk_tokens, -1)[:, kept].flatten(1, 2) for a in (x, eps))  # (B, K * 8, D)
        t, uncond = t[:, kept], uncond[:, kept]  # (B, K)
    t_tok = per_token(t, chunk_tokens)  # (B, K * 8)
    noisy = interpolate(x, eps, t_tok)
    streams = TwoStreams(n, window, chunk_tokens, valid, uncond, kept)
    own = None
    if own_from is not None:
        own = torch.zeros(B, L + t_tok.shape[1], dtype=torch.bool)
        own[:, own_from * chunk_tokens:L] = True
    return FlowBatch(inputs=torch.cat([clean, noisy], dim=1), times=torch.cat([s_tok, t_tok], dim=1),
                     target=target_velocity(x, eps), t=t, streams=streams, pos=streams.positions(), own=own)


def training_batch(x: torch.Tensor, valid: torch.Tensor, cfg: FlowConfig, window: int, chunk_tokens: int,
                   generator: torch.Generator | None = None, context: torch.Tensor | None = None,
                   noisy_chunks: int | None = None, max_t: torch.Tensor | None = None,
                   own_from: int | None = None) -> FlowBatch:
    """Random times, context noise and unconditional chunks for one training batch (context, noisy_chunks, own_from:
    see make_batch). `max_t` (n,), if given, caps each chunk's time: its draw is scaled into (0, max_t)."""
    B, n = valid.shape
    t = sample_times((B, n), cfg, generator)
    if max_t is not None:
        t = t * max_t
    s = cfg.context_noise_max * torch.rand((B, n), generator=generator)
    uncond = torch.rand((B, n), generator=generator) < cfg.p_uncond
    return make_batch(x, valid, t, s, uncond, window, chunk_tokens, generator, context, noisy_chunks, own_from)


def flow_loss(model: FlowDiT, batch: FlowBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared velocity error over valid noisy tokens, and the per-chunk errors (B, K) of the noisy stream."""
    Lk = batch.target.shape[1]
    pred = model(batch.inputs, batch.times, batch.pos, batch.streams, batch.own)[:, -Lk:]  # (B, K * 8, D): noisy stream
    err = (pred.float() - batch.target.float()).pow(2).mean(-1)  # (B, K * 8)
    per_chunk = err.view(err.shape[0], batch.t.shape[1], -1).mean(-1)  # (B, K)
    w = batch.target_valid.float()
    return (per_chunk * w).sum() / w.sum().clamp_min(1), per_chunk.detach()


VAL_T_GRID = (0.05, 0.15, 0.3, 0.5, 0.7, 0.85, 0.95)  # fixed times: validation numbers compare across runs


@torch.no_grad()
def validation_loss(model: FlowDiT, crops: list[tuple[torch.Tensor, torch.Tensor]], context_noise: float,
                    device, t_grid: tuple[float, ...] = VAL_T_GRID, seed: int = 1234,
                    autocast=None, use_context: bool = True) -> dict:
    """Next-chunk loss in the generation setting: every chunk at each grid time, fixed noise, no dropout of context.

    Returns {"loss": mean over times and valid chunks, "by_t": {t: loss}}; identical inputs give identical numbers.
    use_context=False scores the model's unconditional branch (each chunk sees only itself).
    """
    cfg = model.cfg
    totals = torch.zeros(len(t_grid), dtype=torch.float64)
    count = 0.0
    for i, (x, valid) in enumerate(crops):
        K, n = len(t_grid), valid.shape[1]
        g = torch.Generator().manual_seed(seed + i)
        t = torch.tensor(t_grid, dtype=torch.float32)[:, None].expand(K, n)  # (K, n): one time per row
        s = torch.full((K, n), context_noise)
        uncond = torch.full((K, n), not use_context)
        batch = make_batch(x.expand(K, -1, -1), valid.expand(K, -1), t, s, uncond,
                           cfg.context_chunks, cfg.chunk_tokens, g).to(device)
        with autocast() if autocast else contextlib.nullcontext():
            _, per_chunk = flow_loss(model, batch)  # (K, n)
        w = batch.valid.float()
        totals += (per_chunk.float() * w).sum(1).double().cpu()
        count += float(valid.sum())
    by_t = (totals / max(count, 1.0)).tolist()
    return {"loss": sum(by_t) / len(by_t), "by_t": dict(zip(t_grid, by_t))}

