"""Live keyboard controls: single keys, no Enter, in the terminal the stream was started from.

Keys become the same command dicts the JSON protocol carries (state.py), so a key can never do
what a message could not. Steering works on a cursor: `k` picks tokens or channels, `,` `.` (or
the left and right arrows) walk from "all" through each element, and scale/bias keys nudge the
selection. The terminal is put in cbreak mode (no echo, one key at a time, Ctrl-C still stops)
and restored on exit, whatever ends the session. Without a terminal on stdin keys are off.
"""
from __future__ import annotations

import os
import select
import sys
import threading
from dataclasses import dataclass
from typing import Callable

from ..codec import LATENT_DIM, TOKENS_PER_CHUNK
from ..solvers import SOLVERS
from .state import NFE_PRESETS, ControlError, Controls

try:  # POSIX terminals only; elsewhere keys are off and the JSON protocol still works
    import termios
    import tty
except ImportError:
    termios = tty = None

KEYMAP = [  # (keys, what they do): the help screen and the README print this table
    ("q", "quit"),
    ("h ?", "help"),
    ("1 2 3 4", "NFE 1 / 2 / 4 / 8 (rounded to whole solver steps)"),
    ("s", "next solver (" + " > ".join(SOLVERS) + ")"),
    ("t T", "temperature -0.1 / +0.1"),
    ("g G", "guidance (cfg scale) -0.25 / +0.25"),
    ("[ ]", "context window -1 / +1 chunk"),
    ("n", "new random seed, crossfaded over --crossfade-chunks"),
    ("N", "new random seed, hard cut"),
    ("k", "steer tokens <> channels"),
    (", .  (left right)", "steering cursor: all, then each token or channel"),
    ("- +  (down up)", "scale of the selection -0.1 / +0.1"),
    ("b B", "bias of the selection -0.1 / +0.1"),
    ("r", "reset steering (scale 1, bias 0)"),
    ("R", "reset every control to its start value (the seed stays)"),
]
_ARROWS = {"\x1b[A": "+", "\x1b[B": "-", "\x1b[C": ".", "\x1b[D": ","}
_STEPS = {"t": ("temperature", -0.1), "T": ("temperature", 0.1), "g": ("cfg_scale", -0.25),
          "G": ("cfg_scale", 0.25), "[": ("context_chunks", -1), "]": ("context_chunks", 1)}


@dataclass
class Cursor:
    target: str = "token"  # or "channel"
    index: int | None = None  # None: every token (or channel) at once

    @property
    def size(self) -> int:
        return TOKENS_PER_CHUNK if self.target == "token" else LATENT_DIM

    def move(self, step: int) -> None:
        pos = (-1 if self.index is None else self.index) + step  # -1 stands for "all"
        pos = (pos + 1) % (self.size + 1) - 1
        self.index = None if pos < 0 else pos

    def label(self) -> str:
        return f"{self.target}s: all" if self.index is None else f"{self.target} {self.index}"

    def nudge(self, kind: str, delta: float) -> dict:
        field = f"{self.target}_{kind}"
        return {"add": {field: delta if self.index is None else {"index": self.index, "value": delta}}}


class KeyControls:
    """Turns key presses into engine commands; `notify` receives one-line notes for the status display."""

    def __init__(self, engine, notify: Callable[[str], None], show_help: Callable[[], None]):
        self.engine, self.notify, self.show_help = engine, notify, show_help
        self.cursor = Cursor()

    def command(self, key: str) -> dict | None:
        """The protocol message for a key, or None for keys handled here (cursor, help) or unknown."""
        key = _ARROWS.get(key, key)
        c = self.engine.pending
        if key == "q":
            return {"quit": True}
        if key in "1234" and len(key) == 1:
            return {"set": {"nfe": NFE_PRESETS["1234".index(key)]}}
        if key == "s":
            names = list(SOLVERS)
            return {"set": {"solver": names[(names.index(c.solver) + 1) % len(names)]}}
        if key in _STEPS:
            name, step = _STEPS[key]
            return {"add": {name: step}}
        if key in ("n", "N"):
            return {"seed": "random", "mode": "crossfade" if key == "n" else "cut"}
        if key in ("-", "+", "="):
            return self.cursor.nudge("scale", -0.1 if key == "-" else 0.1)
        if key in ("b", "B"):
            return self.cursor.nudge("bias", -0.1 if key == "b" else 0.1)
        if key == "r":
            return {"reset": "steering"}
        if key == "R":
            return {"reset": "all"}
        if key == "k":
            self.cursor = Cursor("channel" if self.cursor.target == "token" else "token")
        elif key in (",", "."):
            self.cursor.move(-1 if key == "," else 1)
        elif key in ("h", "?"):
            self.show_help()
        return None

    def press(self, key: str) -> None:
        msg = self.command(key)
        if msg is None:
            self.notify(f"steering {self.cursor.label()}")
            return
        before = self.engine.pending
        try:
            self.engine.submit(msg)
        except ControlError as exc:  # cannot happen for the keys above; say so rather than crash the terminal
            self.notify(f"refused: {exc}")
            return
        self.notify("quit" if msg.get("quit") else changes(before, self.engine.pending) or "no change (at the limit)")


def changes(before: Controls, after: Controls) -> str:
    """What a command changed, in words: 'temperature 0.9', 'channel_bias[3] 0.1', 'seed 123'."""
    out = []
    for name in Controls.__dataclass_fields__:
        old, new = getattr(before, name), getattr(after, name)
        if old == new:
            continue
        if isinstance(new, tuple):
            diff = [f"[{i}] {v:g}" for i, (o, v) in enumerate(zip(old, new)) if o != v]
            out.append(name + (" " + " ".join(diff) if len(diff) <= 2 else f" {len(diff)} values"))
        else:
            out.append(f"{name} {new:g}" if isinstance(new, float) else f"{name} {new}")
    return ", ".join(out)


class RawKeys:
    """Reads single keys from a terminal on stdin in a thread and calls on_key(key); a no-op without a TTY
    (or with on_key None)."""

    def __init__(self, on_key: Callable[[str], None] | None, stream=None):
        self.on_key, self.stream = on_key, stream or sys.stdin
        self.active = False
        self._saved = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RawKeys":
        try:
            fd = self.stream.fileno()
            tty_in = os.isatty(fd)
        except (AttributeError, OSError, ValueError):
            tty_in = False
        if not tty_in or termios is None or self.on_key is None:  # None: keys not wanted, leave the terminal be
            return self
        self._fd, self._saved = fd, termios.tcgetattr(fd)
        tty.setcbreak(fd)  # keys arrive one by one without echo; Ctrl-C still raises KeyboardInterrupt
        self.active = True
        self._thread = threading.Thread(target=self._run, name="realtime-keys", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            if not select.select([self._fd], [], [], 0.1)[0]:
                continue
            key = os.read(self._fd, 1).decode("latin-1")
            if key == "\x1b":  # an escape sequence (arrow keys) arrives in one burst
                while select.select([self._fd], [], [], 0.01)[0] and len(key) < 8:
                    key += os.read(self._fd, 1).decode("latin-1")
                    if key[-1].isalpha() or key[-1] == "~":
                        break
            self.on_key(key)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
        if self._saved is not None:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
            self._saved = None
