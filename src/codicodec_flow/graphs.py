"""CUDA graphs of the cached pass, and of whole chunks: one launch per evaluation, then per chunk (`--cuda-graphs`).

A cached pass evaluates 8 tokens per stream. On a GPU each of its few hundred kernels finishes in microseconds,
so eager PyTorch spends the pass issuing them from Python. `PassGraphs` captures `FlowDiT._pass` once per
layout of a pass (its roles, shapes and whether it needs a mask) over static input buffers, then replays it.
Each evaluation copies its inputs into those buffers: the chunks' tokens and modulations, and, when a new chunk
begins, the mask and rotation tables. Keys and values land in the cache's scratch slots, whose addresses never
change. The ring append stays outside the graph (KVCache.append_scratch), and so does everything that reads a
value on the host (the cache's bookkeeping, once per chunk). A graph belongs to one set of cache buffers: when the
cache is replaced (resized for rewinding), the graphs are captured again. Once the ring is full, `ChunkGraphs`
captures a whole chunk, ring append included, with the cache reading its position from the device.

`capture=False` runs the same static-buffer plumbing eagerly, so the CPU tests check it against the plain pass.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .errors import FlowError
from .solvers import get_solver

if TYPE_CHECKING:
    from .cache import KVCache
    from .generate import StreamGenerator
    from .model import FlowDiT

WARMUP_PASSES = 3  # eager passes on a side stream before a capture (cuBLAS and the allocator settle; torch's advice)
MAX_CHUNK_GRAPHS = 16  # whole-chunk layouts kept at once: a live guidance knob swept through many values stays bounded


@dataclass
class _Entry:
    """One captured layout: its input buffers, its output, and the tables last copied in."""
    xs: list[torch.Tensor]
    mods: list[tuple[torch.Tensor, ...]]
    mask: torch.Tensor | None
    rope: tuple[torch.Tensor, torch.Tensor]
    tables: tuple = ()  # the (mask, rope) objects whose values the buffers hold: a new chunk brings new ones
    out: torch.Tensor | None = None
    graph: object = None
    runs: int = 0


def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """Copy each src into its dst buffer, in few launches where torch can group them."""
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, src)
    else:  # torch < 2.2
        for d, s in zip(dst, src):
            d.copy_(s)


class _Captures:
    """What both kinds of graphs share: CUDA required to capture, graphs tied to one set of cache buffers, one memory
    pool for a generator's graphs. A subclass holds `capture`, `amp`, `captured`, `_entries`, `_buffers`, `_pool`."""

    def _require_cuda(self) -> None:
        if self.capture and not torch.cuda.is_available():
            raise FlowError("--cuda-graphs needs a CUDA GPU; PyTorch sees none (leave the flag out on a CPU or MPS)")

    def _follow(self, cache: "KVCache") -> bool:
        """Drop the graphs when the cache's buffers changed (resized), and say so: graphs over the old ones would
        write into freed memory. Their memory pool goes with them: the next capture starts a new one."""
        buffers = (cache.k.data_ptr(), cache.v.data_ptr())
        if buffers == self._buffers:
            return False
        self._entries.clear()
        self._buffers, self._pool = buffers, None
        return True

    def _capture(self, entry, compute: Callable[[], torch.Tensor | None],
                 settle: Callable[[], None] = lambda: None) -> None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one memory pool for all of this generator's graphs
        entry.graph, entry.out = _captured(compute, self._pool, self.amp, settle)
        self.captured += 1


@dataclass(eq=False)
class PassGraphs(_Captures):
    """The cached passes of one generator as CUDA graphs, captured on first use of each layout.

    Set as `cache.graphs`; FlowDiT._run_chunks then calls `run` instead of `_pass`."""
    model: "FlowDiT" = field(repr=False)
    amp: torch.dtype | None = None  # the autocast dtype the generator runs under (captured with the weight-cast
    #                                  cache off: cached casts would be freed under a graph that reads them)
    capture: bool = True  # False: the same buffers, run eagerly (CPU tests)
    captured: int = 0  # graphs captured so far
    _entries: dict = field(default_factory=dict, repr=False)
    _buffers: tuple[int, int] | None = field(default=None, repr=False)  # the cache buffers the graphs write into
    _pool: object = field(default=None, repr=False)

    def __post_init__(self):
        self._require_cuda()

    def run(self, xs: list[torch.Tensor], mods: list[tuple[torch.Tensor, ...]], roles: tuple[str, ...],
            mask: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor], cache: "KVCache") -> torch.Tensor | None:
        """FlowDiT._pass's result for these inputs, from the layout's graph (captured now if it is new)."""
        self._follow(cache)
        key = (roles, mask is None, tuple((x.shape, x.dtype) for x in xs),
               tuple((m.shape, m.dtype) for ms in mods for m in ms))
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry([x.clone() for x in xs], [tuple(m.clone() for m in ms) for ms in mods],
                                                None if mask is None else mask.clone(), (rope[0].clone(), rope[1].clone()),
                                                (mask, rope))
        else:
            self._load(entry, xs, mods, mask, rope)
        entry.runs += 1

        def compute() -> torch.Tensor | None:
            return self.model._pass(entry.xs, entry.mods, roles, entry.mask, entry.rope, cache)

        if not self.capture:
            out = compute()
        else:
            if entry.graph is None:
                self._capture(entry, compute)
            entry.graph.replay()
            out = entry.out
        return None if out is None else out.clone()  # the buffer is rewritten by the next replay

    @staticmethod
    def _load(entry: _Entry, xs, mods, mask, rope) -> None:
        dst, src = list(entry.xs), list(xs)
        for d, s in zip(entry.mods, mods):
            dst += d
            src += s
        if entry.tables[0] is not mask or entry.tables[1] is not rope:  # a new chunk: its window and positions
            dst += list(entry.rope) + ([entry.mask] if mask is not None else [])
            src += list(rope) + ([mask] if mask is not None else [])
            entry.tables = (mask, rope)  # held, so their identity cannot pass to new tables
        _copy(dst, src)


@dataclass
class _ChunkEntry:
    """One captured chunk layout: the chunk's start x(t) and the joining chunks' buffers, and the finished chunk."""
    x: torch.Tensor  # (B, 8, 64)
    t: float  # the time x starts at
    joins: list[torch.Tensor]  # (B, 8, 64) each: the context chunks that join in the first evaluation
    levels: tuple[float, ...]  # their noise levels
    keep: list = field(default_factory=list)  # the modulations the graph reads (the generator's dict is bounded)
    out: torch.Tensor | None = None
    graph: object = None
    runs: int = 0


@dataclass(eq=False)
class ChunkGraphs(_Captures):
    """Whole chunks as CUDA graphs: the solver's loop, every evaluation, its arithmetic between them and the joining
    chunk's move into the ring, one launch a chunk (`--cuda-graphs`, once the ring is full).

    Per-pass graphs still leave the host a few dozen launches and a little Python between evaluations, a fixed
    cost that fewer evaluations do not divide. A whole chunk can be one graph because the cache can read its
    position from the device (KVCache.place): the chunk index written before each replay (KVCache.seat) picks the
    mask of the ring's position and the rows of the rotation tables, so one capture serves every chunk of a layout
    (solver, steps, guidance, window, the joining chunks' levels). The host keeps the bookkeeping (the cache's n,
    the queue of joining chunks) and draws the noise as before, so the stream equals the eager one. Stochastic
    solvers, which draw noise inside a chunk, and a ring not yet full (a stream's first W chunks, or just after a
    rewind) run pass by pass (PassGraphs).

    `capture=False` runs the same device-position arithmetic eagerly, so the CPU tests check it against the plain
    stream.
    """
    gen: "StreamGenerator" = field(repr=False)
    amp: torch.dtype | None = None
    capture: bool = True
    captured: int = 0
    _entries: dict = field(default_factory=dict, repr=False)
    _seen: set = field(default_factory=set, repr=False)  # layouts met once
    _buffers: tuple[int, int] | None = field(default=None, repr=False)
    _pool: object = field(default=None, repr=False)

    def __post_init__(self):
        self._require_cuda()

    def ready(self) -> bool:
        """Whether the next chunk can run as one graph."""
        cache = self.gen.cache
        return cache.valid == cache.slots and not get_solver(self.gen.cfg.solver).stochastic

    def run(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """The chunk integrated from x(t) (B, 8, 64) to x(0) against the cache, as the generator's own solve would
        (ready() must hold); the queued context chunks join in its first evaluation."""
        gen, cache = self.gen, self.gen.cache
        if self._follow(cache):
            self._seen.clear()
        joins, levels = [c for c, _ in gen._pending], tuple(s for _, s in gen._pending)
        cfg = gen.cfg
        key = (levels, cache.active, cfg.solver, gen.steps, cfg.schedule, cfg.schedule_shift, cfg.cfg_scale, t,
               x.shape, x.dtype)
        entry = self._entries.get(key)
        if entry is None and key not in self._seen:  # a layout seen once (the first chunk after a prompt) may
            if len(self._seen) >= 4 * MAX_CHUNK_GRAPHS:  # never come back: run it pass by pass, and capture it
                self._seen.clear()  # when it does
            self._seen.add(key)
            return gen.integrate(x, t)
        if entry is None:
            if len(self._entries) >= MAX_CHUNK_GRAPHS:
                self._entries.clear()  # their graphs go; the memory pool they shared is reused by the next captures
            entry = self._entries[key] = _ChunkEntry(x.clone(), t, [c.clone() for c in joins], levels)
        else:
            _copy([entry.x] + entry.joins, [x] + joins)
        entry.runs += 1
        n, valid = cache.n, cache.valid
        cache.seat()  # the position the graph reads: a fill, no copy from the host, no wait
        if not self.capture:
            out = self._solve(entry)
        else:
            if entry.graph is None:
                self._capture_chunk(entry)
            entry.graph.replay()
            out = entry.out.clone()  # the buffer is rewritten by the next replay
        gen._pending = []  # they joined: the bookkeeping the graph's append did on the device
        cache.n, cache.valid = n + len(levels), min(valid + len(levels), cache.slots)
        return out

    def _solve(self, entry: _ChunkEntry) -> torch.Tensor:
        """The chunk's arithmetic with the cache at the device's position; the host's state is left as it was."""
        gen, cache = self.gen, self.gen.cache
        n, valid, graphs = cache.n, cache.valid, cache.graphs
        gen._pending = list(zip(entry.joins, entry.levels))
        cache.graphs = None  # no graph inside a graph
        cache.place(True)
        try:
            return gen.integrate(entry.x, entry.t)
        finally:
            cache.place(False)
            cache.graphs, cache.n, cache.valid, gen._pending = graphs, n, valid, []
            entry.keep = list(gen._mods.values())

    def _capture_chunk(self, entry: _ChunkEntry) -> None:
        cache = self.gen.cache
        # a run moves the joining chunks into the ring, where the real run must still find what they replace
        saved = cache.saved_slots(range(cache.n, cache.n + len(entry.levels)))
        self._capture(entry, lambda: self._solve(entry), lambda: cache.restore_slots(saved))


def _no_cast_cache(amp: torch.dtype | None):
    """The autocast a capture runs under (autocast contexts inside it inherit the cache switch): with the weight-cast
    cache off, since cached casts would be freed under a graph that reads them."""
    return torch.autocast("cuda", dtype=amp or torch.bfloat16, enabled=amp is not None, cache_enabled=False)


def _captured(compute: Callable[[], torch.Tensor | None], pool, amp: torch.dtype | None,
              settle: Callable[[], None] = lambda: None) -> tuple[object, torch.Tensor | None]:
    """A CUDA graph of compute() and its output buffer, after WARMUP_PASSES eager runs on a side stream (settle()
    after each undoes what a run changed that the real one must find as it was)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), _no_cast_cache(amp):
        for _ in range(WARMUP_PASSES):
            compute()
            settle()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: a live engine's other threads (the codec) may use the GPU while this thread captures
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"), _no_cast_cache(amp):
        out = compute()
    return graph, out
