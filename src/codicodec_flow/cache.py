"""KVCache: preallocated, static-shape key/value buffers for streaming one chunk at a time.

Layout along the token axis of every buffer: a ring of S = W + spare chunk slots (chunk n lives in slot n % S),
then `scratch` x 8 scratch slots for the chunks of one pass (see `group`; 3 by default). Keys are stored
rotated once, at their own absolute positions (chunk n's tokens sit at n * 8 + j); because rotary attention
depends only on offsets, a later query rotated at its own absolute position sees exactly the offsets training saw.
The tables are computed in float64 (64 chunks' at a time), so position four million is as exact as position 0 and
a stream can run for hours at constant cost and precision. Nothing here grows, and no key is ever
rotated twice.

Rewinding (live lookahead, realtime/lookahead.py): `rewind(r)` takes back the last r chunks, so a guess can be
replaced by what really happened. The `spare` slots beyond the window keep the chunks a rewound chunk's slot
had overwritten out of sight rather than lost: after rewinding r <= spare chunks the ring still holds the whole
window of the chunk appended next, and appending then gives exactly the keys and values of never having
appended the guesses. `valid` counts the newest chunks whose slots hold what the ring position says; a slot
holding a rewound chunk's leftovers is masked until it is written again.

Device positions (`seat`, `place`): with a full ring a chunk's mask depends only on n mod S, so the cache can take
its position from a tensor on the device instead of the host, picking masks and rotation-table rows by index and
appending by index. A whole chunk captured as one CUDA graph then serves every chunk (graphs.py: ChunkGraphs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .config import ModelConfig
from .rope import apply_rope, rope_table

if TYPE_CHECKING:
    from .graphs import PassGraphs

ROLES = ("context", "cond", "uncond")
SCRATCH_CHUNKS = 3  # one pass can carry a finished chunk joining the context, the new chunk and its unguided twin
ROPE_AHEAD = 64  # chunks whose rotation tables are computed (and copied to the device) at once


@dataclass
class KVCache:
    k: torch.Tensor  # (n_layers, B, H, (W + spare + scratch) * 8, hd) keys rotated at their own positions
    v: torch.Tensor  # (n_layers, B, H, (W + spare + scratch) * 8, hd)
    window: int  # W, chunks of context
    chunk_tokens: int  # 8
    rope_base: float
    n: int = 0  # chunks appended so far = absolute index of the chunk being evaluated
    active: int | None = None  # attend to only the last `active` chunks (None: the whole window W)
    spare: int = 0  # ring slots beyond the window: how many chunks `rewind` may take back
    scratch: int = SCRATCH_CHUNKS  # chunks one pass may carry
    valid: int = 0  # the newest chunks whose ring slots hold them (<= n; less only after a rewind)
    _groups: dict = field(default_factory=dict)  # (n, valid, active, roles) -> (mask, rotation tables)
    _masks: dict = field(default_factory=dict)  # masks by where the ring turns (group)
    _rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None  # rotation tables of ROPE_AHEAD chunks ...
    _rope_first: int = 0  # ... from this one on
    graphs: "PassGraphs | None" = None  # CUDA graphs of the passes over these buffers (graphs.py); None: eager
    _seat: "_Seat | None" = None  # seat(): the position on the device
    _at: int | None = None  # place(): the host's n the device position stood for when the chunk began
    _at_groups: dict = field(default_factory=dict)  # place()'s groups of the current chunk
    _tables: dict = field(default_factory=dict)  # (roles, seen) -> masks of every ring position, device mode

    @staticmethod
    def empty(cfg: ModelConfig, batch: int, device, dtype, spare: int = 0,
              scratch: int = SCRATCH_CHUNKS) -> "KVCache":
        if spare < 0 or scratch < 1:
            raise ValueError(f"spare must be >= 0 and scratch >= 1, got {spare}, {scratch}")
        hd = cfg.dim // cfg.n_heads
        shape = (cfg.n_layers, batch, cfg.n_heads, (cfg.context_chunks + spare + scratch) * cfg.chunk_tokens, hd)
        return KVCache(k=torch.zeros(shape, device=device, dtype=dtype), v=torch.zeros(shape, device=device, dtype=dtype),
                       window=cfg.context_chunks, chunk_tokens=cfg.chunk_tokens, rope_base=cfg.rope_base,
                       spare=spare, scratch=scratch)

    @property
    def slots(self) -> int:
        """S: ring slots, the window and the spare ones."""
        return self.window + self.spare

    @property
    def ring_tokens(self) -> int:
        return self.slots * self.chunk_tokens

    def reset(self) -> None:
        """Forget the past (buffers are kept; masks hide stale slots)."""
        self.n = self.valid = 0
        self._groups.clear()
        self._masks.clear()

    @property
    def rewindable(self) -> int:
        """How many of the newest chunks `rewind` can take back and still leave the next chunk its whole window."""
        return self.n if self.valid == self.n else self.valid - self.window

    def rewind(self, r: int) -> None:
        """Take back the last r chunks appended: the next chunk appended is chunk n - r, seeing what it would have
        seen had they never been appended. At most `rewindable` (up to `spare` once the ring has wrapped)."""
        if not 0 <= r <= self.rewindable:
            raise ValueError(f"can rewind 0..{self.rewindable} chunks here (spare {self.spare}), not {r}")
        self.n -= r
        self.valid -= r

    def resized(self, spare: int, scratch: int) -> "KVCache":
        """A cache with `spare` rewindable slots and room for `scratch` chunks a pass, holding this one's past."""
        L, B, H, _, hd = self.k.shape
        out = KVCache.empty(_Dims(L, H * hd, H, self.window, self.chunk_tokens, self.rope_base), B, self.k.device,
                            self.k.dtype, spare, scratch)
        keep = min(self.valid, out.slots)
        for c in range(self.n - keep, self.n):  # chunk c: from slot c % S to slot c % S'
            out.k[..., out._slot(c), :] = self.k[..., self._slot(c), :]
            out.v[..., out._slot(c), :] = self.v[..., self._slot(c), :]
        out.n, out.valid, out.active, out.graphs = self.n, keep, self.active, self.graphs  # graphs re-capture
        return out

    def _slot(self, chunk: int) -> slice:
        """The ring tokens chunk `chunk` lives in."""
        first = (chunk % self.slots) * self.chunk_tokens
        return slice(first, first + self.chunk_tokens)

    def saved_slots(self, chunks: range) -> list[tuple[slice, torch.Tensor, torch.Tensor]]:
        """Copies of the ring slots the given chunks would go into (`restore_slots` puts them back)."""
        return [(self._slot(c), self.k[..., self._slot(c), :].clone(), self.v[..., self._slot(c), :].clone())
                for c in chunks]

    def restore_slots(self, saved: list[tuple[slice, torch.Tensor, torch.Tensor]]) -> None:
        for where, k, v in saved:
            self.k[..., where, :] = k
            self.v[..., where, :] = v

    def set_active(self, chunks: int | None) -> None:
        """Limit attention to the last `chunks` chunks (1..W), e.g. a live control; None restores W."""
        if chunks is not None and not 1 <= chunks <= self.window:
            raise ValueError(f"context must be 1..{self.window} chunks, got {chunks}")
        self.active = None if chunks == self.window else chunks

    def group(self, roles: tuple[str, ...]) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        """Mask (1, 1, G * 8, R + G * 8) and rotation tables (G * 8, hd) for G chunks evaluated in one pass.

        roles, in scratch order: m >= 0 "context" chunks first (finished chunks joining as chunks n .. n + m - 1;
        each sees the ring and the context chunks before it inside its window, and itself), then "cond" (the new
        chunk, n + m; it sees the ring and the context chunks inside its window, and itself) and/or "uncond" (the
        same chunk without context: only itself). The mask is None where every key is seen (one conditional
        chunk once the window is full and no spare slots): no masking cost in the steady state.

        Made once per chunk and roles (the same objects for every evaluation of a chunk), from tables kept on the
        device: with a full ring the mask depends only on n mod S, so a stream cycles through S of them, and the
        rotation tables are computed ROPE_AHEAD chunks at a time. So a chunk copies nothing from the host: each
        such copy makes the host wait for the GPU (on an H200 they were a third of a graphed NFE 2 chunk).
        """
        if self._at is not None:
            return self._placed_group(roles)
        key = (self.n, self.valid, self.active, roles)
        if key not in self._groups:
            if len(self._groups) > 8:
                self._groups.clear()
            m = self._leading(roles)
            self._groups[key] = (self._mask(roles, m), self._rope(roles, m))
        return self._groups[key]

    def _leading(self, roles: tuple[str, ...]) -> int:
        """How many context chunks lead the group (checking that the roles make a valid pass)."""
        m = next((i for i, role in enumerate(roles) if role != "context"), len(roles))
        if "context" in roles[m:] or len(roles) > self.scratch or not set(roles) <= set(ROLES):
            raise ValueError(f"roles {roles}: context chunks come first, at most {self.scratch} chunks")
        return m

    def _mask(self, roles: tuple[str, ...], m: int) -> torch.Tensor | None:
        seen = self.active or self.window
        # once the ring is full (valid == S: every slot holds the chunk its position says), which slots a chunk
        # sees depends only on where the ring turns, n mod S
        key = (roles, seen, self.n % self.slots) if self.valid == self.slots else (roles, seen, self.n, self.valid)
        if key not in self._masks:
            if len(self._masks) >= 4 * self.slots + 16:  # changing windows or rewinds: stay bounded
                self._masks.clear()
            self._masks[key] = self._build_mask(roles, m, seen, self.n, self.valid)
        return self._masks[key]

    def _build_mask(self, roles: tuple[str, ...], m: int, seen: int, n: int, valid: int) -> torch.Tensor | None:
        """The group's mask with chunk n next and the newest `valid` chunks held (None where every key is seen)."""
        S, T, G = self.slots, self.chunk_tokens, len(roles)
        slot_chunk = n - 1 - (n - 1 - torch.arange(S)) % S  # (S,) the chunk each ring slot holds
        held = slot_chunk >= max(0, n - valid)  # written, and not a rewound chunk's leftovers
        rows = []
        for g, role in enumerate(roles):
            e = n + min(g, m)  # the chunk index this one is evaluated as
            ring = held & (e - slot_chunk <= seen)  # inside its window
            if role == "uncond":
                ring = torch.zeros(S, dtype=torch.bool)
            scratch = torch.zeros(G, dtype=torch.bool)
            scratch[g] = True  # itself
            if role != "uncond":  # the chunks joining the context before it, inside its window
                scratch[:min(g, m)] = e - (n + torch.arange(min(g, m))) <= seen
            rows.append(torch.cat([ring, scratch]).repeat_interleave(T)[None].expand(T, -1))  # (8, R + G * 8)
        mask = torch.cat(rows)[None, None]  # (1, 1, G * 8, R + G * 8), read here on the host, then moved
        return None if bool(mask.all()) else mask.to(self.k.device)

    def _rope(self, roles: tuple[str, ...], m: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunks = [self.n + min(g, m) for g in range(len(roles))]  # the position of each, in chunks
        first = self._rope_first
        if self._rope_tables is None or chunks[0] < first or chunks[-1] >= first + ROPE_AHEAD:
            first = self._rope_first = chunks[0]
            T = self.chunk_tokens
            self._rope_tables = rope_table(torch.arange(first * T, (first + ROPE_AHEAD) * T), self.k.shape[-1],
                                           self.rope_base, self.k.device)  # (ROPE_AHEAD * 8, hd) each
        rows = [slice((c - first) * self.chunk_tokens, (c - first + 1) * self.chunk_tokens) for c in chunks]
        if chunks == list(range(chunks[0], chunks[-1] + 1)):  # consecutive (no unguided twin): one view
            return tuple(tab[rows[0].start:rows[-1].stop] for tab in self._rope_tables)
        return tuple(torch.cat([tab[r] for r in rows]) for tab in self._rope_tables)

    def seat(self) -> None:
        """Write the host's position where device positions read it (before each replay of a chunk graph): the index
        of the next chunk, and, every ROPE_AHEAD chunks, the rotation tables it indexes (computed on the host in
        float64, as group()'s are). A fill and, now and then, a copy: nothing waits for the device."""
        T, dev = self.chunk_tokens, self.k.device
        if self._seat is None:
            hd = self.k.shape[-1]
            index = [torch.zeros((), dtype=torch.long, device=dev) for _ in range(2)]
            self._seat = _Seat(*index, torch.empty(ROPE_AHEAD * T, hd, device=dev),
                               torch.empty(ROPE_AHEAD * T, hd, device=dev))
        seat = self._seat
        if seat.first is None or not seat.first <= self.n <= seat.first + ROPE_AHEAD - self.scratch:  # a pass's chunks
            cos, sin = rope_table(torch.arange(self.n * T, (self.n + ROPE_AHEAD) * T), self.k.shape[-1],
                                  self.rope_base, dev)
            seat.cos.copy_(cos)
            seat.sin.copy_(sin)
            seat.first_at.fill_(self.n)
            seat.first = self.n
        seat.base.fill_(self.n)

    def place(self, on: bool) -> None:
        """From now on read the stream position from the device (seat() wrote it), not from the host: so one captured
        chunk, its evaluations and its ring append, serves every position of a full ring (ChunkGraphs in graphs.py).
        The host's n and valid are still kept; False goes back to host positions."""
        if on and (self.valid != self.slots or self._seat is None):
            raise ValueError(f"device positions need a full ring ({self.valid} of {self.slots} slots held) and seat()")
        self._at = self.n if on else None
        self._at_groups.clear()

    def _placed_group(self, roles: tuple[str, ...]) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        """group() at the device's position: the mask picked from those of all S ring positions, the rotation tables'
        rows picked from seat()'s. Nothing is read back to the host."""
        seat, seen, delta = self._seat, self.active or self.window, self.n - self._at
        key = (roles, seen, delta)
        if key not in self._at_groups:  # once per chunk: its first pass, then the evaluations after the join
            m, S, T = self._leading(roles), self.slots, self.chunk_tokens
            if (roles, seen) not in self._tables:  # built on the host before any capture (the warm-up passes)
                masks = [self._build_mask(roles, m, seen, n, S) for n in range(S, 2 * S)]  # ring turned at n % S
                full = torch.ones((1, 1, len(roles) * T, self.ring_tokens + len(roles) * T), dtype=torch.bool,
                                  device=self.k.device)
                table = None if all(x is None for x in masks) else torch.cat([full if x is None else x for x in masks])
                g = torch.arange(len(roles) * T)  # (G * 8,) token of the group
                rel = (g // T).clamp(max=m) * T + g % T  # its position after the group's first chunk's first token
                self._tables[(roles, seen)] = (table, rel.to(self.k.device))
            table, rel = self._tables[(roles, seen)]
            e = seat.base + delta  # () the group's first chunk
            mask = None if table is None else table.index_select(0, (e % S).view(1))  # (1, 1, G * 8, R + G * 8)
            rows = (e - seat.first_at) * T + rel  # (G * 8,) rows of seat()'s tables
            self._at_groups[key] = (mask, (seat.cos.index_select(0, rows), seat.sin.index_select(0, rows)))
        return self._at_groups[key]

    def stage(self, layer: int, k: torch.Tensor, v: torch.Tensor,
              rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Put the group's k (projected, rotated here with its tables) and v (B, H, G * 8, hd) into the scratch
        slots; return this layer's keys and values over the ring and those G chunks."""
        R, end = self.ring_tokens, self.ring_tokens + k.shape[2]
        self.k[layer, :, :, R:end] = apply_rope(k, *rope)
        self.v[layer, :, :, R:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def append_scratch(self, m: int = 1) -> None:
        """Move the first m scratch chunks ("context" ones) into their ring slots: context for the chunks after."""
        T, R = self.chunk_tokens, self.ring_tokens
        if self._at is not None:  # slots from the device's position: one index copy
            i = torch.arange(m * T, device=self.k.device)  # (m * 8,) the joining tokens
            into = ((self._seat.base + (self.n - self._at) + i // T) % self.slots) * T + i % T  # (m * 8,) ring tokens
            for buf in (self.k, self.v):
                buf.index_copy_(3, into, buf[..., R:R + m * T, :].clone())  # clone: source and target share buf
        else:
            for i in range(m):
                slot, src = self._slot(self.n + i), R + i * T
                self.k[..., slot, :] = self.k[..., src:src + T, :]
                self.v[..., slot, :] = self.v[..., src:src + T, :]
        self.n += m
        self.valid = min(self.valid + m, self.slots)

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
        self.n = self.valid = n


@dataclass
class _Seat:
    """The position device positions read (KVCache.seat): the next chunk's index, and rotation tables of ROPE_AHEAD
    chunks from chunk `first` on."""
    base: torch.Tensor  # () int64
    first_at: torch.Tensor  # () int64, = first
    cos: torch.Tensor  # (ROPE_AHEAD * 8, hd)
    sin: torch.Tensor  # (ROPE_AHEAD * 8, hd)
    first: int | None = None


@dataclass(frozen=True)
class _Dims:
    """What KVCache.empty reads of a ModelConfig (resized keeps the dimensions it already has)."""
    n_layers: int
    dim: int
    n_heads: int
    context_chunks: int
    chunk_tokens: int
    rope_base: float
