"""Timeline: audio placed at positions of the output stream, so that a chunk sounds at a chosen moment.

The ring (ring.py) plays chunks one after another as soon as they come, so a chunk sounds whenever the
ones before it have finished. A lookahead engine (lookahead.py) needs each chunk to start at a moment on
the performer's grid instead. Here the sink's reader takes position after position at its own clock,
whatever is there (silence where nothing was placed), and says with each block when its first sample
will sound (the timer sink's deadline, or the sound card's DAC time: the card's output latency and the
audio it has queued are inside that figure). The latest block gives the anchor that turns a moment into
a position, so `place(wave, at)` puts a chunk where its first sample sounds at `at`.

A chunk that arrives too late for that loses its late head (what is left plays where it belongs on the
grid, faded in over 10 ms); one that is wholly past, or that must start whole (`whole=True`), is dropped.
So lateness is never carried into the chunks after it, and nothing piles up. A chunk that lands within
`SNAP` of where the previous one ended is joined to it exactly, so the jitter of a card's timestamps never
opens a gap or an overlap of a few samples (a click) between chunks. The buffer is preallocated:
`capacity` samples ahead of the reader, and nothing grows.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from ..codec import CHANNELS, SAMPLE_RATE
from .ring import Marks

FADE = 480  # samples (10 ms at 48 kHz) over which a chunk whose head was cut fades in
SNAP = 0.02  # seconds: a chunk this close to where the previous one ended starts exactly there


@dataclass(frozen=True)
class Placement:
    position: int  # the stream position its first sample belongs at
    lead_s: float  # how long before the reader reached that position it was placed (negative: that late)
    cut: int  # samples of its head that were already past (0: on time; its whole length: dropped)
    length: int

    @property
    def dropped(self) -> bool:
        return self.cut >= self.length


class Timeline:
    """The output stream by position; one writer places chunks, one clocked reader plays them (see above)."""

    def __init__(self, capacity: int, rate: float = SAMPLE_RATE):
        self.capacity, self.rate = capacity, rate  # rate: samples per second of the reader's clock
        self._buf = np.zeros((CHANNELS, capacity), dtype=np.float32)  # (2, capacity), position p at p % capacity
        self._pos = 0  # the next position the reader takes
        self._end = 0  # the end of the furthest audio placed
        self._placed = False
        self._anchor: tuple[int, float] | None = None  # (position, when it sounds): the reader's latest block
        self._cond = threading.Condition()
        self.closed = False
        self.underruns = 0  # blocks the reader took past the end of what was placed (something came late)
        self.peak = 0
        self.read_ahead_s = 0.0  # how long before they sound the reader takes samples: output latency + a block
        self.now = time.perf_counter  # the clock sounds_at is on
        self.marks = Marks(rate)

    @property
    def level(self) -> int:
        """Samples placed ahead of the reader."""
        return max(0, self._end - self._pos)

    def place(self, wave: np.ndarray, at: float, stop: threading.Event | None = None, mark: object = None,
              whole: bool = False) -> Placement | None:
        """Put (2, n) audio where its first sample sounds at `at` (time.perf_counter()); see the module docstring.
        Waits for the reader's clock to start; None if stopped or closed first. A `mark` (a tag) records when the
        first sample that plays sounds (`sounded()`)."""
        n = wave.shape[1]
        with self._cond:
            while self._anchor is None:
                if self.closed or (stop is not None and stop.is_set()):
                    return None
                self._cond.wait(0.05)
            if self.closed:
                return None
            anchor, when = self._anchor
            start = anchor + round((at - when) * self.rate)
            if self._placed and abs(start - self._end) <= SNAP * self.rate:
                start = self._end
            cut = min(n, max(0, self._pos - start))
            if whole and cut:
                cut = n
            if start + n > self._pos + self.capacity:  # further ahead than the buffer reaches: the clocks disagree
                cut = n
            if cut < n:
                part = wave[:, cut:]
                if cut:
                    part = part.copy()
                    fade = min(FADE, part.shape[1])
                    part[:, :fade] *= np.linspace(0.0, 1.0, fade, dtype=np.float32)
                self._put(start + cut, part)
                if mark is not None:
                    self.marks.add(start + cut, mark)
                self._end, self._placed = max(self._end, start + n), True
                self.peak = max(self.peak, self.level)
                self._cond.notify_all()
            return Placement(start, (start - self._pos) / self.rate, cut, n)

    def _put(self, position: int, part: np.ndarray) -> None:
        first = position % self.capacity
        head = min(part.shape[1], self.capacity - first)
        self._buf[:, first:first + head] = part[:, :head]
        self._buf[:, :part.shape[1] - head] = part[:, head:]  # wrap around (a no-op when nothing is left)

    def read(self, n: int, wait: bool = False, sounds_at: float | None = None) -> np.ndarray | None:
        """Take the next n positions as (2, n) (silence where nothing was placed) and move on, at the reader's clock
        (`wait` is accepted for the ring's interface; a timeline never waits). sounds_at: when the first of them
        sounds (None: now). None once closed and played out."""
        with self._cond:
            if self.closed and self._pos >= self._end:
                return None
            now = self.now()
            when = now if sounds_at is None else sounds_at
            self._anchor = (self._pos, when)
            self.read_ahead_s = max(0.0, when - now) + n / self.rate
            if self._placed and not self.closed and self._pos + n > self._end:
                self.underruns += 1
            first = self._pos % self.capacity
            head = min(n, self.capacity - first)
            out = np.concatenate([self._buf[:, first:first + head], self._buf[:, :n - head]], axis=1)  # (2, n)
            self._buf[:, first:first + head] = 0.0  # played: silence until something is placed there again
            self._buf[:, :n - head] = 0.0
            self.marks.passed(self._pos, n, when)
            self._pos += n
            left = self._end - (self._pos - n)
            self._cond.notify_all()
        return out if not self.closed or left >= n else out[:, :max(0, left)]

    def sounded(self) -> list[tuple[object, float]]:
        """(mark, when its chunk's first played sample sounded) for the marked chunks started since the last call."""
        with self._cond:
            return self.marks.take()

    def wait_until(self, predicate, stop: threading.Event | None = None, timeout: float | None = None) -> bool:
        """Block until predicate(level) holds, the timeline closes, stop is set or timeout passes; True if it held."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not (predicate(self.level) or self.closed or (stop is not None and stop.is_set())):
                left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
                if left <= 0:
                    break
                self._cond.wait(left)
            return bool(predicate(self.level))

    def close(self, discard: bool = False) -> None:
        """No more placements; the reader plays out what is placed (discard=True: nothing more is played)."""
        with self._cond:
            self.closed = True
            if discard:
                self._end = self._pos
            self._cond.notify_all()
