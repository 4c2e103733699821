"""CUDA graphs of the cached pass: one launch per model evaluation instead of hundreds (`--cuda-graphs`).

A cached pass evaluates 8 tokens per stream. On a GPU each of its few hundred kernels finishes in microseconds,
so eager PyTorch spends the pass issuing them from Python. `PassGraphs` captures `FlowDiT._pass` once per
layout of a pass (its roles, shapes and whether it needs a mask) over static input buffers, then replays it.
Each evaluation copies its inputs into those buffers: the chunks' tokens and modulations, and, when a new chunk
begins, the mask and rotation tables. Keys and values land in the cache's scratch slots, whose addresses never
change. The ring append stays outside the graph (KVCache.append_scratch), and so does everything that reads a
value on the host (the cache's bookkeeping, once per chunk). A graph belongs to one set of cache buffers: when the
cache is replaced (resized for rewinding), the graphs are captured again.

`capture=False` runs the same static-buffer plumbing eagerly, so the CPU tests check it against the plain pass.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .errors import FlowError

if TYPE_CHECKING:
    from .cache import KVCache
    from .model import FlowDiT

WARMUP_PASSES = 3  # eager passes on a side stream before a capture (cuBLAS and the allocator settle; torch's advice)


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


@dataclass(eq=False)
class PassGraphs:
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
        if self.capture and not torch.cuda.is_available():
            raise FlowError("--cuda-graphs needs a CUDA GPU; PyTorch sees none (leave the flag out on a CPU or MPS)")

    def run(self, xs: list[torch.Tensor], mods: list[tuple[torch.Tensor, ...]], roles: tuple[str, ...],
            mask: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor], cache: "KVCache") -> torch.Tensor | None:
        """FlowDiT._pass's result for these inputs, from the layout's graph (captured now if it is new)."""
        buffers = (cache.k.data_ptr(), cache.v.data_ptr())
        if buffers != self._buffers:  # a new cache: graphs over the old buffers would write into freed memory
            self._entries.clear()  # their memory pool goes with them: the next capture starts a new one
            self._buffers, self._pool = buffers, None
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

    def _autocast(self):
        return torch.autocast("cuda", dtype=self.amp or torch.bfloat16, enabled=self.amp is not None,
                              cache_enabled=False)

    def _capture(self, entry: _Entry, compute: Callable[[], torch.Tensor | None]) -> None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one memory pool for all of this generator's graphs
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self._autocast():
            for _ in range(WARMUP_PASSES):
                compute()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a live engine's other threads (the codec) may use the GPU while this thread captures
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"), self._autocast():
            entry.out = compute()
        entry.graph = graph
        self.captured += 1
