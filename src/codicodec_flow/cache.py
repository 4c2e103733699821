"""KVCache: preallocated, static-shape key/value buffers for streaming one chunk at a time.

Layout along the token axis of every buffer: a ring of W chunk slots (chunk n lives in slot n % W),
then 8 scratch slots for the chunk being evaluated. Keys are stored rotated once, at their own
absolute positions (chunk n's tokens sit at n * 8 + j); because rotary attention depends only on
offsets, a later query rotated at its own absolute position sees exactly the offsets training saw.
The tables are computed in float64 per chunk, so position four million is as exact as position 0 and
a stream can run for hours at constant cost and precision. Nothing here grows, and no key is ever
rotated twice.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig
from .rope import apply_rope, rope_table


@dataclass
class KVCache:
    k: torch.Tensor  # (n_layers, B, H, (W + 1) * 8, hd) keys rotated at their own positions, ring + scratch
    v: torch.Tensor  # (n_layers, B, H, (W + 1) * 8, hd)
    window: int  # W, chunks of context
    chunk_tokens: int  # 8
    rope_base: float
    n: int = 0  # chunks appended so far = absolute index of the chunk being evaluated
    active: int | None = None  # attend to only the last `active` chunks (None: the whole window W)
    _prepared_for: int = -1
    _rope: tuple[torch.Tensor, torch.Tensor] | None = None  # the new chunk's rotation tables, (8, hd) each
    _masks: tuple[torch.Tensor | None, torch.Tensor] | None = None

    @staticmethod
    def empty(cfg: ModelConfig, batch: int, device, dtype) -> "KVCache":
        hd = cfg.dim // cfg.n_heads
        shape = (cfg.n_layers, batch, cfg.n_heads, (cfg.context_chunks + 1) * cfg.chunk_tokens, hd)
        return KVCache(k=torch.zeros(shape, device=device, dtype=dtype), v=torch.zeros(shape, device=device, dtype=dtype),
                       window=cfg.context_chunks, chunk_tokens=cfg.chunk_tokens, rope_base=cfg.rope_base)

    @property
    def ring_tokens(self) -> int:
        return self.window * self.chunk_tokens

    @property
    def query_rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotation tables for the chunk being evaluated (positions n * 8 + j), (8, hd) each; after prepare()."""
        return self._rope

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
        """The new chunk's rotation tables and the masks of which slots it sees; once per chunk, not per step."""
        if self._prepared_for == self.n:
            return
        W, T = self.window, self.chunk_tokens
        device = self.k.device
        self._rope = rope_table(torch.arange(self.n * T, (self.n + 1) * T), self.k.shape[-1], self.rope_base, device)
        age = (self.n - torch.arange(W) - 1) % W + 1  # slot s holds the chunk `age` steps back
        valid = torch.zeros(W + 1, dtype=torch.bool)
        valid[:W] = (torch.arange(W) < min(self.n, W)) & (age <= (self.active or W))  # written, inside the window
        valid[W] = True  # scratch: the chunk itself
        ctx = valid.repeat_interleave(T).to(device)[None, None, None]  # (1, 1, 1, (W + 1) * 8)
        own = torch.zeros_like(ctx)
        own[..., self.ring_tokens:] = True
        self._masks = (None if bool(valid.all()) else ctx, own)  # no mask at all in the steady state
        self._prepared_for = self.n

    def query_mask(self, use_context: bool) -> torch.Tensor | None:
        """Which cache slots the new chunk's queries may see (None: all of them)."""
        return self._masks[0] if use_context else self._masks[1]

    def stage(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Put the new chunk's k (projected, not yet rotated) and v (B, H, 8, hd) into the scratch slots;
        return this layer's keys and values, ring + scratch."""
        R = self.ring_tokens
        self.k[layer, :, :, R:] = apply_rope(k, *self._rope)
        self.v[layer, :, :, R:] = v
        return self.k[layer], self.v[layer]

    def append_scratch(self) -> None:
        """Move the scratch chunk into its ring slot: it becomes context for the chunks after it."""
        T, R = self.chunk_tokens, self.ring_tokens
        slot = (self.n % self.window) * T
        self.k[..., slot:slot + T, :] = self.k[..., R:, :]
        self.v[..., slot:slot + T, :] = self.v[..., R:, :]
        self.n += 1

    def store_prefix(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Prefill: keys rotated at positions 0 .. n * 8 - 1 and values (B, H, n * 8, hd) of chunks 0..n-1
        into ring slots 0..n-1 of an empty cache; `mark_prefilled(n)` once every layer is stored."""
        if self.n != 0:
            raise ValueError(f"prefill needs an empty cache; this one holds {self.n} chunks")
        tokens = k.shape[2]
        self.k[layer, :, :, :tokens] = k
        self.v[layer, :, :, :tokens] = v

    def mark_prefilled(self, n: int) -> None:
        """The first n chunks are stored (store_prefix on every layer): the next chunk evaluated is chunk n."""
        self.n, self._prepared_for = n, -1
