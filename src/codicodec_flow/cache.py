"""KVCache: preallocated, static-shape key/value buffers for streaming one chunk at a time.

Layout along the token axis of every buffer: a ring of W chunk slots (chunk n lives in slot n % W),
then 3 x 8 scratch slots for the chunks of one pass (see `group`). Keys are stored rotated once, at their own
absolute positions (chunk n's tokens sit at n * 8 + j); because rotary attention depends only on
offsets, a later query rotated at its own absolute position sees exactly the offsets training saw.
The tables are computed in float64 per chunk, so position four million is as exact as position 0 and
a stream can run for hours at constant cost and precision. Nothing here grows, and no key is ever
rotated twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import ModelConfig
from .rope import apply_rope, rope_table

ROLES = ("context", "cond", "uncond")
SCRATCH_CHUNKS = 3  # one pass can carry a finished chunk joining the context, the new chunk and its unguided twin


@dataclass
class KVCache:
    k: torch.Tensor  # (n_layers, B, H, (W + 1) * 8, hd) keys rotated at their own positions, ring + scratch
    v: torch.Tensor  # (n_layers, B, H, (W + 1) * 8, hd)
    window: int  # W, chunks of context
    chunk_tokens: int  # 8
    rope_base: float
    n: int = 0  # chunks appended so far = absolute index of the chunk being evaluated
    active: int | None = None  # attend to only the last `active` chunks (None: the whole window W)
    _groups: dict = field(default_factory=dict)  # (n, active, roles) -> (mask, rotation tables)

    @staticmethod
    def empty(cfg: ModelConfig, batch: int, device, dtype) -> "KVCache":
        hd = cfg.dim // cfg.n_heads
        shape = (cfg.n_layers, batch, cfg.n_heads, (cfg.context_chunks + SCRATCH_CHUNKS) * cfg.chunk_tokens, hd)
        return KVCache(k=torch.zeros(shape, device=device, dtype=dtype), v=torch.zeros(shape, device=device, dtype=dtype),
                       window=cfg.context_chunks, chunk_tokens=cfg.chunk_tokens, rope_base=cfg.rope_base)

    @property
    def ring_tokens(self) -> int:
        return self.window * self.chunk_tokens

    def reset(self) -> None:
        """Forget the past (buffers are kept; masks hide stale slots)."""
        self.n = 0
        self._groups.clear()

    def set_active(self, chunks: int | None) -> None:
        """Limit attention to the last `chunks` chunks (1..W), e.g. a live control; None restores W."""
        if chunks is not None and not 1 <= chunks <= self.window:
            raise ValueError(f"context must be 1..{self.window} chunks, got {chunks}")
        self.active = None if chunks == self.window else chunks

    def group(self, roles: tuple[str, ...]) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        """Mask (1, 1, G * 8, R + G * 8) and rotation tables (G * 8, hd) for G chunks evaluated in one pass.

        roles, in scratch order: "context" (only first: a finished chunk joining as chunk n; it sees the ring
        and itself), "cond" (the new chunk, n or n + 1 after a context chunk; it sees the ring, the context chunk
        and itself), "uncond" (the same chunk without context: only itself). The mask is None where every
        key is seen (one conditional chunk once the window is full): no masking cost in the steady state.
        Computed once per chunk and roles, not per step.
        """
        key = (self.n, self.active, roles)
        if key not in self._groups:
            if len(self._groups) > 8:
                self._groups.clear()
            self._groups[key] = self._build_group(roles)
        return self._groups[key]

    def _build_group(self, roles: tuple[str, ...]):
        W, T, G = self.window, self.chunk_tokens, len(roles)
        if "context" in roles[1:] or G > SCRATCH_CHUNKS or not set(roles) <= set(ROLES):
            raise ValueError(f"roles {roles}: a context chunk comes first, at most {SCRATCH_CHUNKS} chunks")
        joined = roles[0] == "context"
        device = self.k.device
        slot_chunk = self.n - 1 - (self.n - 1 - torch.arange(W)) % W  # (W,) the chunk each ring slot holds
        rows, positions = [], []
        for g, role in enumerate(roles):
            e = self.n + (joined and g > 0)  # the chunk index this one is evaluated as
            ring = (slot_chunk >= 0) & (e - slot_chunk <= (self.active or W))  # written, inside its window
            if role == "uncond":
                ring = torch.zeros(W, dtype=torch.bool)
            scratch = torch.zeros(G, dtype=torch.bool)
            scratch[g] = True  # itself
            scratch[0] |= joined and role == "cond"  # the chunk that joins the context before it
            rows.append(torch.cat([ring, scratch]).repeat_interleave(T)[None].expand(T, -1))  # (8, R + G * 8)
            positions.append(torch.arange(e * T, (e + 1) * T))
        mask = torch.cat(rows).to(device)[None, None]  # (1, 1, G * 8, R + G * 8)
        rope = rope_table(torch.cat(positions), self.k.shape[-1], self.rope_base, device)  # (G * 8, hd) each
        return (None if bool(mask.all()) else mask), rope

    def stage(self, layer: int, k: torch.Tensor, v: torch.Tensor,
              rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Put the group's k (projected, rotated here with its tables) and v (B, H, G * 8, hd) into the scratch
        slots; return this layer's keys and values over the ring and those G chunks."""
        R, end = self.ring_tokens, self.ring_tokens + k.shape[2]
        self.k[layer, :, :, R:end] = apply_rope(k, *rope)
        self.v[layer, :, :, R:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def append_scratch(self) -> None:
        """Move the first scratch chunk (a "context" one) into its ring slot: context for the chunks after it."""
        T, R = self.chunk_tokens, self.ring_tokens
        slot = (self.n % self.window) * T
        self.k[..., slot:slot + T, :] = self.k[..., R:R + T, :]
        self.v[..., slot:slot + T, :] = self.v[..., R:R + T, :]
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
        self.n = n
