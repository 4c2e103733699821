"""MIDI control: a controller's knobs and pads steer the stream through a map (midi_map.py), over mido's ports.

`MidiControl` reads mido messages from a port (its callback hands them to a queue) or from any iterable
(tests inject them), turns each into a protocol command with `midi_command` and submits it to the engine,
whose apply_message checks it like every other front end's. Learn mode: `{"midi_learn": "temperature"}`
from any front end (the engine hands it to `MidiControl.learn`) or --midi-learn arms it; the next CC that
arrives is bound to the control and the map is saved atomically to --midi-map.
"""
from __future__ import annotations

import inspect
import logging
import queue
import threading
from pathlib import Path
from typing import Iterable

import mido

from ..errors import FlowError
from .midi_map import DEFAULT_MAP, MidiMap, check_map, learn_range, midi_command, parse_target, save_map
from .state import ControlError

log = logging.getLogger(__name__)

VIRTUAL_NAME = "codicodec-flow"  # the port --midi virtual opens, for a DAW or a sequencer to send to


def _no_midi(exc: BaseException) -> FlowError:
    if isinstance(exc, ImportError):
        return FlowError("MIDI needs python-rtmidi: pip install python-rtmidi (wheels exist for Python 3.10-3.12; "
                         "elsewhere it builds from source and needs a C++ compiler and ALSA or JACK headers)")
    return FlowError(f"no MIDI system to open ports with ({exc}); on Linux that is ALSA's sequencer (/dev/snd/seq, "
                     f"module snd-seq), or JACK: run a JACK server and set MIDO_BACKEND=mido.backends.rtmidi/UNIX_JACK")


def input_names() -> list[str]:
    """The MIDI input ports the system offers (mido's rtmidi backend)."""
    try:
        return list(mido.get_input_names())
    except (ImportError, OSError) as exc:
        raise _no_midi(exc) from None


def open_input(spec: str):
    """A mido input port: "virtual" (named VIRTUAL_NAME), an index into input_names(), or (part of) a port's name."""
    try:
        if spec == "virtual":
            return mido.open_input(VIRTUAL_NAME, virtual=True)
        names = input_names()
        listing = ", ".join(f"{i}: {n}" for i, n in enumerate(names)) or "none"
        if spec.isdigit():
            if int(spec) >= len(names):
                raise FlowError(f"--midi {spec}: no MIDI input with that index (ports: {listing})")
            return mido.open_input(names[int(spec)])
        found = [n for n in names if n == spec] or [n for n in names if spec.lower() in n.lower()]
        if len(found) != 1:
            why = "no MIDI input port matches" if not found else "several MIDI input ports match"
            raise FlowError(f"--midi {spec!r}: {why} (ports: {listing}); give the index or more of the name")
        return mido.open_input(found[0])
    except (ImportError, OSError) as exc:
        raise _no_midi(exc) from None
    except NotImplementedError:
        raise FlowError("--midi virtual: this system's MIDI backend has no virtual ports (Windows); use a loopback "
                        "driver such as loopMIDI and give its port name") from None


class MidiControl:
    """Reads MIDI messages from `source` (a mido input port, or any iterable of mido.Message: tests inject
    them) in a thread and submits the commands `mapping` makes of them; learns bindings (see the module).
    close() closes a source that has a close() (a port)."""

    def __init__(self, engine, source: Iterable, mapping: MidiMap = DEFAULT_MAP, path: str | Path | None = None,
                 learn: str | None = None):
        self.engine, self.source, self.path = engine, source, path
        self._inbox: queue.Queue | None = None
        if isinstance(source, mido.ports.BaseInput):  # a port's own iterator blocks for ever, even once closed
            self._inbox = queue.Queue()
            source.callback = self._inbox.put  # called on the MIDI system's thread
            source = _drain(self._inbox)
        self._messages = source
        self.mapping = mapping
        self._lock, self._closed = threading.Lock(), threading.Event()
        self._learning: str | None = None
        check_map(mapping, engine.limits, str(path or "the default MIDI map"))
        if learn is not None:
            try:
                self.learn(learn)
            except ControlError as exc:
                raise FlowError(f"--midi-learn: {exc}") from None
        engine.midi_learn = self.learn  # {"midi_learn": ...} from any front end lands here
        self._thread = threading.Thread(target=self._run, name="realtime-midi", daemon=True)
        self._thread.start()

    def learn(self, target: str) -> None:
        """Bind the next CC that arrives to `target`; ControlError if MIDI cannot drive it."""
        learn_range(parse_target(target)[0])
        with self._lock:
            self._learning = target
        log.info("MIDI learn: move a knob to bind it to %s", target)

    @property
    def learning(self) -> str | None:
        with self._lock:
            return self._learning

    def handle(self, msg) -> dict | None:
        """Apply one MIDI message (learning first, if armed); the command submitted, if any."""
        with self._lock:
            if self._learning is not None and msg.type == "control_change":
                self._bind(self._learning, msg.control, msg.channel + 1)
                self._learning = None
            mapping = self.mapping
        command = midi_command(msg, mapping, self.engine.pending, self.engine.limits.window)
        if command is None:
            return None
        try:
            self.engine.submit(command)  # every value, repeats too: another front end may have moved it meanwhile
        except ControlError as exc:  # check_map makes this rare (a pad's command the state no longer allows)
            log.warning("MIDI %s refused: %s", msg, exc)
            return None
        return command

    def _bind(self, target: str, cc: int, channel: int) -> None:
        self.mapping = self.mapping.bind(target, cc, channel)
        b = self.mapping.knob(cc, channel)
        saved = ""
        if self.path is not None:
            try:
                save_map(self.mapping, self.path)
                saved = f"; saved to {self.path}"
            except (OSError, FlowError) as exc:
                saved = f"; NOT saved to {self.path} ({exc})"
        log.info("MIDI learn: CC %d on channel %d -> %s (%s..%s, %s)%s", cc, channel, target, b.lo, b.hi, b.curve,
                 saved)

    def _run(self) -> None:
        try:
            for msg in self._messages:
                if self._closed.is_set():
                    break
                try:
                    self.handle(msg)
                except Exception:  # on stage, one message gone wrong must not silence the controller
                    log.exception("MIDI message %s could not be handled", msg)
        except OSError as exc:  # the device was unplugged
            if not self._closed.is_set():
                log.warning("MIDI input stopped: %s", exc)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the source is exhausted (an injected list); True if it was."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self) -> None:
        self._closed.set()
        if self.engine.midi_learn == self.learn:
            self.engine.midi_learn = None
        if hasattr(self.source, "close") and not inspect.isgenerator(self.source):
            self.source.close()
        if self._inbox is not None:
            self._inbox.put(None)
        self._thread.join(1.0)


def _drain(inbox: queue.Queue):
    """The messages a port's callback queued, until the None that close() puts."""
    while (msg := inbox.get()) is not None:
        yield msg
