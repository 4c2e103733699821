"""Where the package's log lines go when a person is watching: one handler on the `codicodec_flow` logger.

The library logs (progress lines, training metrics without the dashboard, notes); it never prints.
Commands and notebooks call `show_logs()` to see them on stderr, so stdout stays for results (and,
with `realtime --control stdin`, for the JSON event stream alone).
"""
from __future__ import annotations

import logging
import sys

ROOT = "codicodec_flow"


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the moment (test capture and notebooks swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return f"note: {text}" if record.levelno >= logging.WARNING else text


def show_logs(level: int = logging.INFO) -> None:
    """Send the package's log records at `level` and above to stderr, once however often it is called."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(level)
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(_Format())
        logger.addHandler(handler)
