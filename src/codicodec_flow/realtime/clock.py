"""The clock the performer's and the sink's moments are read on.

A live input (live_input.py) waits for the performer on it and stamps its chunks with it; the engine reads the
moments it compares with them (latency, alignment) from the same clock (`Engine.now`: its input's `clock`).
The real one is time.perf_counter(), which a sound card's and a timer sink's moments are on too. A simulation
(tests/test_lookahead.py) swaps in a clock whose time only moves while the performer is waited for, so a
headless test measures alignment exactly however busy the machine is.
"""
from __future__ import annotations

import threading
import time


class RealClock:
    """time.perf_counter(), and a wait on it that a stop request ends early."""

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    @staticmethod
    def sleep_until(t: float, stop: threading.Event) -> bool:
        """Wait until now() >= t; True if stop was set first."""
        return stop.wait(max(0.0, t - time.perf_counter()))


REAL_CLOCK = RealClock()
