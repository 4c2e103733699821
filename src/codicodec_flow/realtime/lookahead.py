"""Lookahead: accompaniment that sounds in time with the performer (realtime --lookahead N).

Without it, the chunk generated after the performer's chunk k continues chunk k, but it can only start
sounding once it is encoded, generated, decoded and the audio queued before it has played: about a chunk
and `play_delay_s` after chunk k started, so the band is always late and off the performer's chunk grid.

With lookahead N the engine, when input chunk k is complete, makes the chunk for slot k + N: the one that
will be sounding while the performer plays input chunk k + N, and it is placed on the output so that it
starts exactly when the performer starts that chunk (timeline.py; the input's started_at times carry the
capture latency out, the sink's sounding times the output latency). The model therefore continues a
context that ends with the performer's real chunks up to k and then its own chunks for slots k + 1 ..
k + N - 1: its guesses of what the performer plays next, which are also what the band plays then. When the
real chunk k + 1 arrives, the guesses are taken back from the context (StreamGenerator.rewind), the real
chunk goes in, and the guesses still ahead go back exactly as they were (add_noised_context), so the
context is what it would have been had the model known. Per input chunk that is N context chunks (on the
torch backend joined into the first pass of the new chunk's ODE) and one chunk generated: constant cost.

At the start (and after an input chunk was dropped) the guesses for the slots in between do not exist yet:
they are generated first, in order, and those that can no longer start on time are not played (they still
serve as guesses): the band comes in on the first slot it can make whole.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from .live_input import InputChunk

MAX_LOOKAHEAD = 8  # chunks (5.5 s): each costs a context chunk per input chunk and a chunk of scratch


@dataclass(frozen=True)
class Guess:
    slot: int  # the input chunk it stands for
    ctx: torch.Tensor  # (B, 8, 64) as it went into the context (re-noised), put back as it was
    wave: np.ndarray  # (2, 32768) what the band played in that slot (--listen mix hears it with the input)


class Lookahead:
    """The guesses in the context and the performer's grid, for one stream."""

    def __init__(self, n: int, period: float):
        if not 1 <= n <= MAX_LOOKAHEAD:
            raise ValueError(f"lookahead must be 1..{MAX_LOOKAHEAD} chunks, got {n}")
        self.n, self.period = n, period  # period: seconds between input chunks on the input's clock
        self.guesses: deque[Guess] = deque()  # slots after the newest real chunk, oldest first
        self._grid: tuple[int, float] | None = None  # (input chunk, when the performer started it)
        self._base: int | None = None  # the context length where the guesses start
        self._next = 0  # the next slot to generate (slots are generated once, in order)

    def target(self, slot: int) -> float:
        """When output chunk `slot` must start sounding: when the performer starts input chunk `slot`."""
        k, started = self._grid
        return started + (slot - k) * self.period

    def slots(self, heard: InputChunk) -> range:
        """The slots to generate once `heard` is in the context: normally just heard.index + N; at the start, or after
        a gap in the input, also the ones in between that have no guess yet."""
        return range(max(self._next, heard.index + 1), heard.index + self.n + 1)

    def played_in(self, slot: int) -> np.ndarray | None:
        """What the band played in `slot`, if it was one of the guesses."""
        return next((g.wave for g in self.guesses if g.slot == slot), None)

    def follow(self, gen, heard: InputChunk, hear) -> None:
        """Put the performer's chunk in place of the model's guess for it: take the guesses back from gen's
        context, hear() (adds the real chunk), then put back the guesses for the slots still ahead."""
        if heard.started_at is None:
            raise ValueError("lookahead needs an input with a clock (a paced --input-wav or a sound card)")
        self._grid = (heard.index, heard.started_at)
        if self._base is not None:
            gen.rewind(gen.context_length - self._base)
        while self.guesses and self.guesses[0].slot <= heard.index:
            self.guesses.popleft()
        hear()
        self._base = gen.context_length
        for g in self.guesses:
            gen.add_noised_context(g.ctx)

    def keep(self, slot: int, ctx: torch.Tensor | None, wave: np.ndarray) -> None:
        """Slot `slot` is generated: its chunk (None: given up, silence) is a guess until the real one arrives."""
        self._next = slot + 1
        if ctx is not None:
            self.guesses.append(Guess(slot, ctx, wave))


def suggested_lookahead(ready_s: list[float], read_ahead_s: float, period: float) -> int | None:
    """The smallest lookahead whose slot the chunks would have made: N with p95(ready) + read-ahead <= N periods.

    ready_s: per chunk, from the moment the performer started the input chunk it answered to the moment it was
    queued (a chunk of input, capture latency, encode, generate, decode); read_ahead_s: how long before a sample
    sounds the sink takes it (output latency and one block)."""
    if not ready_s:
        return None
    need = float(np.percentile(ready_s, 95)) + read_ahead_s
    return max(1, math.ceil(need / period - 1e-9))
