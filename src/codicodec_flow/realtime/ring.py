"""AudioRing: a bounded, preallocated, thread-safe ring of stereo float32 audio between generator and sink.

One writer (the generation thread pushes whole decoded chunks) and one reader (the sink pulls
blocks of any size). The capacity is fixed: a full ring blocks the writer, so generating faster
than real time can never grow memory. A clocked reader that asks for audio that is not there
gets the part that is, padded with silence, and the shortfall counts as an underrun; once the
writer has closed the ring, reading drains what is left without counting anything.

A clocked reader says when the first sample of each block it takes will sound (`sounds_at`, on the
time.perf_counter() clock: its deadline, or the sound card's DAC time); a chunk written with a `mark` then
records when its first sample sounded (`Marks`), which is how the engine measures alignment with a performer.
"""
from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

from ..codec import CHANNELS, SAMPLE_RATE


class Marks:
    """Stream positions of chunk starts, and when each one sounded once a reader passed it (bounded both ways).
    Not thread-safe by itself: the ring or timeline holding it calls it under its own lock."""

    LIMIT = 256  # marks waiting or sounded but not yet collected; the oldest go first

    def __init__(self, rate: float):
        self.rate = rate  # samples per second of the reader's clock
        self._waiting: deque[tuple[int, object]] = deque(maxlen=self.LIMIT)  # (position, tag), in position order
        self._sounded: deque[tuple[object, float]] = deque(maxlen=self.LIMIT)  # (tag, when)

    def add(self, position: int, tag: object) -> None:
        self._waiting.append((position, tag))

    def passed(self, start: int, count: int, sounds_at: float | None) -> None:
        """A reader took positions start .. start + count - 1, the first sounding at sounds_at (None: unclocked)."""
        while self._waiting and self._waiting[0][0] < start + count:
            position, tag = self._waiting.popleft()
            if sounds_at is not None and position >= start:
                self._sounded.append((tag, sounds_at + (position - start) / self.rate))

    def take(self) -> list[tuple[object, float]]:
        """(tag, when its first sample sounded) of the marks passed since the last call."""
        out = list(self._sounded)
        self._sounded.clear()
        return out


class AudioRing:
    """Bounded FIFO of (2, n) float32 audio; see the module docstring."""

    def __init__(self, capacity: int, rate: float = SAMPLE_RATE):
        self.capacity, self.rate = capacity, rate  # rate: samples per second of the reader's clock
        self._buf = np.zeros((CHANNELS, capacity), dtype=np.float32)  # (2, capacity)
        self._start = 0  # index of the oldest sample
        self._level = 0  # samples held
        self._cond = threading.Condition()
        self.closed = False
        self.underruns = 0
        self.peak = 0  # the most samples ever held at once
        self._written = self._taken = 0  # samples written and read so far (padding not counted)
        self.marks = Marks(rate)
        self.read_ahead_s = 0.0  # how long before they sound a clocked reader takes samples (output latency + a block)
        self.now = time.perf_counter  # the clock sounds_at is on

    @property
    def level(self) -> int:
        return self._level

    def write(self, wave: np.ndarray, stop: threading.Event | None = None, mark: object = None) -> bool:
        """Append (2, n) audio, waiting while the ring is full; False if stopped or closed first. A `mark` (a tag)
        records when the first sample sounds (`marks.take()`)."""
        n = wave.shape[1]
        if n > self.capacity:
            raise ValueError(f"a write of {n} samples cannot fit a ring of {self.capacity}")
        with self._cond:
            while self._level + n > self.capacity:
                if self.closed or (stop is not None and stop.is_set()):
                    return False
                self._cond.wait(0.05)  # short waits so a stop request is seen promptly
            if self.closed:
                return False
            end = (self._start + self._level) % self.capacity
            first = min(n, self.capacity - end)
            self._buf[:, end:end + first] = wave[:, :first]
            self._buf[:, :n - first] = wave[:, first:]  # wrap around (a no-op when nothing is left)
            if mark is not None:
                self.marks.add(self._written, mark)
            self._level += n
            self._written += n
            self.peak = max(self.peak, self._level)
            self._cond.notify_all()
        return True

    def read(self, n: int, wait: bool, sounds_at: float | None = None) -> np.ndarray | None:
        """Take n samples as (2, n). wait=True blocks for them (an unclocked sink, never an underrun);
        wait=False pads a shortfall with silence and counts an underrun. None once closed and empty.
        sounds_at: when the first sample taken will sound, for a clocked reader (marks.take())."""
        with self._cond:
            if wait:
                while self._level < n and not self.closed:
                    self._cond.wait(0.05)
            if self._level == 0 and self.closed:
                return None
            take = min(n, self._level)
            if take < n and not self.closed:
                self.underruns += 1
            out = np.zeros((CHANNELS, n), dtype=np.float32)
            first = min(take, self.capacity - self._start)
            out[:, :first] = self._buf[:, self._start:self._start + first]
            out[:, first:take] = self._buf[:, :take - first]
            self._start = (self._start + take) % self.capacity
            self._level -= take
            self.marks.passed(self._taken, take, sounds_at)
            self._taken += take
            if sounds_at is not None:
                self.read_ahead_s = max(0.0, sounds_at - self.now()) + n / self.rate
            self._cond.notify_all()
        return out if take == n or not self.closed else out[:, :take]

    def wait_until(self, predicate, stop: threading.Event | None = None, timeout: float | None = None) -> bool:
        """Block until predicate(level) holds, the ring closes, stop is set or timeout passes; True if it held."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not (predicate(self._level) or self.closed or (stop is not None and stop.is_set())):
                left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
                if left <= 0:
                    break
                self._cond.wait(left)  # short waits: a stop request does not notify the condition
            return bool(predicate(self._level))

    def sounded(self) -> list[tuple[object, float]]:
        """(mark, when its chunk's first sample sounded) for the marked chunks that started since the last call."""
        with self._cond:
            return self.marks.take()

    def close(self, discard: bool = False) -> None:
        """No more writes; discard=True also drops what has not been played (a quit stops at once)."""
        with self._cond:
            self.closed = True
            if discard:
                self._level = 0
            self._cond.notify_all()
