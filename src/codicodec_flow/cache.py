"""KVCache: preallocated, static-shape key/value buffers for streaming one chunk at a time.

Layout along the token axis of every buffer: a ring of W chunk slots (chunk n lives in slot n % W),
then 8 scratch slots for the chunk being evaluated. Keys are stored as projected (not rotated);
once per new chunk (`prepare`) they are rotated to window-relative positions: the chunk k steps back sits at
position (W - k) * 8 + j and the new chunk at W * 8 + j. Because rotary attention depends only on
offsets this equals the absolute positions used in training, while every number stays bounded,
so a stream can run for hours at constant cost and precision. Nothing here grows or syncs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig
from .rope import apply_rope, rope_table


@dataclass
class KVCache:
    k: torch.Tensor  # (n_layers, B, H, (W + 1) * 8, hd) projected keys, ring + scratch
    k_rot: torch.Tensor  # same shape: keys rotated for the current chunk's positions
    v: torch.Tensor  # (n_layers, B, H, (W + 1) * 8, hd)
    cos: torch.Tensor  # ((W + 1) * 8, hd/2) rotary table for positions 0 .. (W + 1) * 8 - 1
    sin: torch.Tensor
    window: int  # W, chunks of context
    chunk_tokens: int  # 8
    n: int = 0  # chunks appended so far = absolute index of the chunk being evaluated
    active: int | None = None  # attend to only the last `active` chunks (None: the whole window W)
    _prepared_for: int = -1
    _masks: tuple[torch.Tensor | None, torch.Tensor] | None = None

    @staticmethod
    def empty(cfg: ModelConfig, batch: int, device, dtype) -> "KVCache":
        hd = cfg.dim // cfg.n_heads
        size = (cfg.context_chunks + 1) * cfg.chunk_tokens
        shape = (cfg.n_layers, batch, cfg.n_heads, size, hd)
        cos, sin = rope_table(torch.arange(size), hd, cfg.rope_base, device)
        return KVCache(k=torch.zeros(shape, device=device, dtype=dtype), k_rot=torch.zeros(shape, device=device, dtype=dtype),
                       v=torch.zeros(shape, device=device, dtype=dtype), cos=cos, sin=sin,
                       window=cfg.context_chunks, chunk_tokens=cfg.chunk_tokens)

    @property
    def ring_tokens(self) -> int:
        return self.window * self.chunk_tokens

    @property
    def query_rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables for the chunk being evaluated, (8, hd/2) each."""
        return self.cos[self.ring_tokens:], self.sin[self.ring_tokens:]

    def reset(self) -> None:
        """Forget the past (buffers are kept; masks hide stale slots)."""
        self.n, self._prepared_for, self._masks = 0, -1, None

    def set_active(self, chunks: int | None) -> None:
        """Limit attention to the last `chunks` chunks (1..W), e.g. a live control; None restores W."""
        if chunks is not None and not 1 <= chunks <= self.window:
            raise ValueError(f"context must be 1..{self.window} chunks, got {chunks}")
        self.active = None if chunks == self.window else chunks
        self._prepared_for = -1

    def prepare(self) -> None:
        """Rotate the ring's keys to positions relative to chunk n; once per chunk, not per step."""
        if self._prepared_for == self.n:
            return
        W, T = self.window, self.chunk_tokens
        slot_pos = torch.roll(torch.arange(W), shifts=self.n % W) * T  # slot s holds position ((s - n) mod W) * 8
        idx = (slot_pos[:, None] + torch.arange(T)).flatten().to(self.cos.device)  # (W * 8,)
        R = self.ring_tokens
        self.k_rot[..., :R, :] = apply_rope(self.k[..., :R, :], self.cos[idx], self.sin[idx])
        age = (self.n - torch.arange(W) - 1) % W + 1  # slot s holds the chunk `age` steps back
        valid = torch.zeros(W + 1, dtype=torch.bool)
        valid[:W] = (torch.arange(W) < min(self.n, W)) & (age <= (self.active or W))  # written, inside the window
        valid[W] = True  # scratch: the chunk itself
        ctx = valid.repeat_interleave(T).to(self.cos.device)[None, None, None]  # (1, 1, 1, (W + 1) * 8)
        own = torch.zeros_like(ctx)
        own[..., R:] = True
        self._masks = (None if bool(valid.all()) else ctx, own)  # no mask at all in the steady state
        self._prepared_for = self.n

    def query_mask(self, use_context: bool) -> torch.Tensor | None:
        """Which cache slots the new chunk's queries may see (None: all of them)."""
        return self._masks[0] if use_context else self._masks[1]

    def stage(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Put the new chunk's k, v (B, H, 8, hd) into the scratch slots; return this layer's keys and values."""
        R = self.ring_tokens
        self.k[layer, :, :, R:] = k
        self.k_rot[layer, :, :, R:] = apply_rope(k, *self.query_rope)
        self.v[layer, :, :, R:] = v
        return self.k_rot[layer], self.v[layer]

    def append_scratch(self) -> None:
        """Move the scratch chunk into its ring slot: it becomes context for the chunks after it."""
        T, R = self.chunk_tokens, self.ring_tokens
        slot = (self.n % self.window) * T
        self.k[..., slot:slot + T, :] = self.k[..., R:, :]
        self.v[..., slot:slot + T, :] = self.v[..., R:, :]
        self.n += 1

    def store_prefix(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Prefill: keys (unrotated, as append_scratch stores them) and values (B, H, n * 8, hd) of chunks 0..n-1
        into ring slots 0..n-1 of an empty cache; `mark_prefilled(n)` once every layer is stored."""
        if self.n != 0:
            raise ValueError(f"prefill needs an empty cache; this one holds {self.n} chunks")
        tokens = k.shape[2]
        self.k[layer, :, :, :tokens] = k
        self.v[layer, :, :, :tokens] = v

    def mark_prefilled(self, n: int) -> None:
        """The first n chunks are stored (store_prefix on every layer): the next chunk evaluated is chunk n."""
        self.n, self._prepared_for = n, -1
