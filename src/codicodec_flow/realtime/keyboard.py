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
    ("x X", "randomise the selected steering (tokens or channels) / both, spread 0.5"),
    ("a", "auto-cycle seeds every 32 chunks on / off"),
    ("o", "every LFO on / off"),
    ("v V", "gain -0.1 / +0.1 (0..2; limited at full scale)"),
    ("c C", "crossfade length -1 / +1 chunk"),
    ("p P", "recall the next / previous preset, morphing over 8 chunks"),
    ("W", "save the controls as a new preset (key-1, key-2, ...)"),
]
RANDOM_SPREAD = 0.5
AUTO_CYCLE = 32
PRESET_MORPH = 8
_ARROWS = {"\x1b[A": "+", "\x1b[B": "-", "\x1b[C": ".", "\x1b[D": ","}
_STEPS = {"t": ("temperature", -0.1), "T": ("temperature", 0.1), "g": ("cfg_scale", -0.25),
          "G": ("cfg_scale", 0.25), "[": ("context_chunks", -1), "]": ("context_chunks", 1),
          "v": ("gain", -0.1), "V": ("gain", 0.1), "c": ("crossfade_chunks", -1), "C": ("crossfade_chunks", 1)}


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
        self.preset: str | None = None  # the preset p / P last recalled

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
        if key in ("x", "X"):
            what = "both" if key == "X" else self.cursor.target + "s"
            return {"randomise": {"what": what, "spread": RANDOM_SPREAD}}
        if key == "a":
            return {"auto_cycle": 0 if c.auto_cycle else AUTO_CYCLE}
        if key == "o":
            if not c.lfos:
                self.notify("no LFOs set (send them with the JSON protocol or OSC)")
                return None
            on = not any(lfo.on for lfo in c.lfos)
            return {"lfo": [{"id": lfo.id, "on": on} for lfo in c.lfos]}
        if key in ("p", "P", "W"):
            return self._preset_command(key)
        if key == "k":
            self.cursor = Cursor("channel" if self.cursor.target == "token" else "token")
        elif key in (",", "."):
            self.cursor.move(-1 if key == "," else 1)
        elif key in ("h", "?"):
            self.show_help()
        return None

    def _preset_command(self, key: str) -> dict | None:
        store = self.engine.limits.presets
        names = store.names() if store is not None else []
        if key == "W":
            taken = set(names)
            return {"preset": {"save": next(f"key-{i}" for i in range(1, len(names) + 2) if f"key-{i}" not in taken)}}
        if not names:
            self.notify("no presets saved yet (W saves one)")
            return None
        at = names.index(self.preset) if self.preset in names else (-1 if key == "p" else 0)
        self.preset = names[(at + (1 if key == "p" else -1)) % len(names)]
        return {"preset": {"recall": self.preset, "morph_chunks": PRESET_MORPH}}

    def press(self, key: str) -> None:
        msg = self.command(key)
        if msg is None:
            if key not in ("p", "P", "o"):
                self.notify(f"steering {self.cursor.label()}")
            return
        before = self.engine.pending
        try:
            self.engine.submit(msg)
        except ControlError as exc:  # cannot happen for the keys above; say so rather than crash the terminal
            self.notify(f"refused: {exc}")
            return
        preset = msg.get("preset", {})
        said = (f"saved preset {preset['save']}" if "save" in preset else
                f"preset {preset['recall']} (morphing over {PRESET_MORPH} chunks)" if "recall" in preset else None)
        self.notify("quit" if msg.get("quit") else said or changes(before, self.engine.pending) or
                    "no change (at the limit)")


def changes(before: Controls, after: Controls) -> str:
    """What a command changed, in words: 'temperature 0.9', 'channel_bias[3] 0.1', 'seed 123'."""
    out = []
    for name in Controls.__dataclass_fields__:
        old, new = getattr(before, name), getattr(after, name)
        if old == new or name in ("morph", "events"):
            continue
        if name == "lfos":
            out.append("LFOs " + (" ".join(f"{lfo.id}:{'on' if lfo.on else 'off'}" for lfo in new) or "none"))
        elif isinstance(new, tuple):
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
