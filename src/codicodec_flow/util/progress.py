"""Progress reporting: a rich bar with ETA on a terminal, plain log lines elsewhere (CI, files, notebooks)."""
from __future__ import annotations

import logging
import sys
import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

log = logging.getLogger(__name__)


def interactive() -> bool:
    """True when stdout is a terminal a person is watching."""
    return sys.stdout.isatty()


class Reporter:
    """Counts work items; draws a bar on a terminal, logs one line per item (at most every plain_every_s) otherwise."""

    def __init__(self, total: int, description: str, plain: bool | None = None, plain_every_s: float = 0.0):
        self.total, self.description = total, description
        self.plain_every_s, self._last_line = plain_every_s, float("-inf")
        self.plain = (not interactive()) if plain is None else plain
        self.done, self.t0 = 0, time.perf_counter()
        self._bar: Progress | None = None

    def __enter__(self) -> "Reporter":
        if not self.plain:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=Console())
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, note="")
        return self

    def advance(self, note: str = "", n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n, note=note)
        elif self.done == self.total or time.perf_counter() - self._last_line >= self.plain_every_s:
            self._last_line = time.perf_counter()
            elapsed = self._last_line - self.t0
            eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
            log.info(f"{self.description} [{self.done}/{self.total}] {note}  (elapsed {elapsed:.0f}s, eta {eta:.0f}s)")

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
