"""MIDI maps: which knob (control change, CC) and which pad (note) of a controller drives what, as pure data.

A map (a JSON file, or DEFAULT_MAP for an 8-knob controller) binds
    a CC number (on one MIDI channel, or on any) to a control, with the range its 0..127 sweeps and a curve:
        {"cc": 70, "control": "temperature", "min": 0, "max": 2, "curve": "linear"}
        {"cc": 76, "control": "channel_scale", "index": [0, 31], "min": 0, "max": 2}   elements 0..31 together
        {"cc": 21, "channel": 2, "control": "channel_bias", "index": 12, "min": -1, "max": 1}
    a note (a pad) to any command of the JSON protocol, sent when it is struck (note on, velocity > 0):
        {"note": 36, "command": {"seed": "random"}}
`midi_command` turns one MIDI message into the command dict it stands for (a pure function); every
command then goes through engine.submit, i.e. state.apply_message, the validator every front end shares.
`check_map` runs a map through that same validator, at both ends of every knob, so a bad file fails at
start with its name rather than on stage. `MidiMap.bind` is learn mode's step: a knob to a target
(NAME, NAME/INDEX or NAME/FIRST-LAST), keeping the range the target had, else LEARN_RANGES'.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import FlowError
from ..util.fsutil import write_text_atomic
from .state import RANGES, VECTORS, ControlError, Controls, Limits, apply_message

CURVES = ("linear", "exp")  # exp: equal knob turns multiply the value by equal ratios (min and max above 0)
WINDOW = "window"  # a context_chunks end that stands for the checkpoint's window W
_DEFAULTS = Controls()
# Controls a knob can drive: the numbers and the steering vectors (not the solver's name, nor the seed).
KNOBS = tuple(n for n in Controls.__dataclass_fields__ if n in VECTORS or (
    n != "seed" and isinstance(getattr(_DEFAULTS, n), (int, float)) and not isinstance(getattr(_DEFAULTS, n), bool)))
LEARN_RANGES = {"temperature": (0.0, 2.0, "linear"), "cfg_scale": (0.0, 4.0, "linear"), "nfe": (1, 16, "exp"),
                "context_chunks": (1, WINDOW, "linear"),
                **{n: ((0.0, 2.0, "linear") if n.endswith("scale") else (-1.0, 1.0, "linear")) for n in VECTORS}}


@dataclass(frozen=True)
class CCBinding:
    """A knob: CC `cc` (on MIDI `channel` 1..16, None: any) sweeps `control` from lo (0) to hi (127)."""
    cc: int
    control: str
    lo: float | int | str  # a number, or "window" for context_chunks
    hi: float | int | str
    curve: str = "linear"
    channel: int | None = None
    index: int | tuple[int, int] | None = None  # vectors: None = every element, i, or (first, last) inclusive

    @property
    def target(self) -> str:
        """What the binding drives, as learn mode names it: temperature, channel_bias/12, channel_scale/0-31."""
        if self.index is None:
            return self.control
        return f"{self.control}/{self.index}" if isinstance(self.index, int) else \
            f"{self.control}/{self.index[0]}-{self.index[1]}"

    def to_json(self) -> dict:
        out: dict = {"cc": self.cc}
        if self.channel is not None:
            out["channel"] = self.channel
        out["control"] = self.control
        if self.index is not None:
            out["index"] = self.index if isinstance(self.index, int) else list(self.index)
        return {**out, "min": self.lo, "max": self.hi, "curve": self.curve}


@dataclass(frozen=True)
class NoteBinding:
    """A pad: striking `note` (on `channel` 1..16, None: any) sends `command`, a JSON protocol command."""
    note: int
    command: dict
    channel: int | None = None

    def to_json(self) -> dict:
        return {"note": self.note, **({"channel": self.channel} if self.channel is not None else {}),
                "command": self.command}


@dataclass(frozen=True)
class MidiMap:
    cc: tuple[CCBinding, ...] = ()
    notes: tuple[NoteBinding, ...] = ()

    def knob(self, cc: int, channel: int) -> CCBinding | None:
        """The binding of CC `cc` arriving on `channel` (1..16): one for that channel first, else one for any."""
        found = [b for b in self.cc if b.cc == cc and b.channel in (channel, None)]
        return min(found, key=lambda b: b.channel is None, default=None)

    def pad(self, note: int, channel: int) -> NoteBinding | None:
        found = [b for b in self.notes if b.note == note and b.channel in (channel, None)]
        return min(found, key=lambda b: b.channel is None, default=None)

    def bind(self, target: str, cc: int, channel: int | None) -> "MidiMap":
        """This map with CC `cc` on `channel` driving `target` instead of whatever it drove, and `target` driven
        by nothing else; the range and curve are those `target` had here, else LEARN_RANGES'."""
        control, index = parse_target(target)
        old = next((b for b in self.cc if b.target == target), None)
        lo, hi, curve = (old.lo, old.hi, old.curve) if old else learn_range(control)
        kept = tuple(b for b in self.cc if b.target != target and (b.cc, b.channel) != (cc, channel))
        return replace(self, cc=kept + (CCBinding(cc, control, lo, hi, curve, channel, index),))

    def to_json(self) -> dict:
        return {"cc": [b.to_json() for b in self.cc], "notes": [b.to_json() for b in self.notes]}


# An 8-knob controller with pads (e.g. Akai MPK mini: knobs CC 70-77, pads notes 36-43). CC 70-77 are MIDI's
# "sound controllers", so they do not clash with a keyboard's mod wheel (CC 1) or volume (CC 7).
DEFAULT_MAP = MidiMap(
    cc=(CCBinding(70, "temperature", 0.0, 2.0), CCBinding(71, "cfg_scale", 0.0, 4.0),
        CCBinding(72, "nfe", 1, 16, "exp"), CCBinding(73, "context_chunks", 1, WINDOW),
        CCBinding(74, "token_scale", 0.0, 2.0), CCBinding(75, "token_bias", -1.0, 1.0),
        CCBinding(76, "channel_scale", 0.0, 2.0, index=(0, 31)),
        CCBinding(77, "channel_scale", 0.0, 2.0, index=(32, 63))),
    notes=(NoteBinding(36, {"seed": "random"}), NoteBinding(37, {"reset": "steering"}),
           NoteBinding(38, {"seed": "random", "mode": "cut"}), NoteBinding(39, {"reset": "all"})))


def learn_range(control: str) -> tuple:
    """(min, max, curve) a knob learned for `control` sweeps when the mapping had no range for it."""
    if control in LEARN_RANGES:
        return LEARN_RANGES[control]
    if control in RANGES:
        return (*RANGES[control], "linear")
    raise ControlError(f"no knob range is known for {control!r}: bind it in the MIDI map file by hand")


def parse_target(text: object) -> tuple[str, int | tuple[int, int] | None]:
    """"temperature" -> ("temperature", None); "channel_bias/12" -> (.., 12); "channel_scale/0-31" -> (.., (0, 31))."""
    if not isinstance(text, str):
        raise ControlError(f"a MIDI target is a control name such as \"temperature\" or \"channel_bias/12\", "
                           f"got {text!r}")
    name, _, rest = text.partition("/")
    if name not in KNOBS:
        raise ControlError(f"MIDI cannot drive {name!r}: choose one of {', '.join(KNOBS)} (vectors take /INDEX or "
                           f"/FIRST-LAST, e.g. channel_bias/12)")
    if not rest:
        return name, None
    if name not in VECTORS:
        raise ControlError(f"{text!r}: only {', '.join(VECTORS)} take an index")
    first, dash, last = rest.partition("-")
    if not first.isdigit() or (dash and not last.isdigit()):
        raise ControlError(f"{text!r}: the index is a number or a range FIRST-LAST, e.g. {name}/3 or {name}/0-3")
    return name, _index([int(first), int(last)] if dash else int(first), name, text)


def _index(value, name: str, where: str) -> int | tuple[int, int]:
    n = VECTORS[name]
    ends = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not (isinstance(ends, list) and len(ends) in (1, 2) and all(isinstance(i, int) and not isinstance(i, bool)
                                                                  and 0 <= i < n for i in ends)
            and ends[0] <= ends[-1]):
        raise ControlError(f"{where}: {name} index must be 0..{n - 1} or a range [first, last] within it, "
                           f"got {value!r}")
    return ends[0] if isinstance(value, int) else (ends[0], ends[1])


def cc_value(b: CCBinding, value: int, window: int) -> float | int:
    """Where CC value 0..127 puts the binding's control: lo at 0, hi at 127, along the curve."""
    lo, hi = (window if end == WINDOW else end for end in (b.lo, b.hi))
    x = min(127, max(0, value)) / 127
    v = lo * (hi / lo) ** x if b.curve == "exp" else lo + (hi - lo) * x
    return round(v) if isinstance(getattr(_DEFAULTS, b.control), int) else round(v, 4)  # 0.5039, not 0.503937...


def knob_command(b: CCBinding, value: int, controls: Controls, window: int) -> dict:
    """The command that puts CC value 0..127 on b's control (a range of elements: the others as they are)."""
    v = cc_value(b, value, window)
    if b.index is None:
        return {"set": {b.control: v}}  # a vector takes one number for every element
    if isinstance(b.index, int):
        return {"set": {b.control: {"index": b.index, "value": v}}}
    first, last = b.index
    old = getattr(controls, b.control)
    return {"set": {b.control: [v if first <= i <= last else x for i, x in enumerate(old)]}}


def midi_command(msg, mapping: MidiMap, controls: Controls, window: int) -> dict | None:
    """The protocol command one MIDI message stands for under `mapping`, or None (unbound, a note off, clock...)."""
    if msg.type == "control_change":
        b = mapping.knob(msg.control, msg.channel + 1)  # mido counts channels 0..15, musicians 1..16
        return None if b is None else knob_command(b, msg.value, controls, window)
    if msg.type == "note_on" and msg.velocity > 0:
        b = mapping.pad(msg.note, msg.channel + 1)
        return None if b is None else json.loads(json.dumps(b.command))  # a copy: the map stays untouched
    return None


# ---------------------------------------------------------------------------------------------- files

def parse_map(data: object, where: str) -> MidiMap:
    """A mapping from decoded JSON; FlowError naming `where` and the entry for anything malformed."""
    if not isinstance(data, dict) or set(data) - {"cc", "notes"}:
        raise FlowError(f"{where}: a MIDI map is a JSON object with \"cc\" and \"notes\" lists, e.g. "
                        f'{{"cc": [{{"cc": 70, "control": "temperature", "min": 0, "max": 2}}], '
                        f'"notes": [{{"note": 36, "command": {{"seed": "random"}}}}]}}')
    knobs, pads = data.get("cc", []), data.get("notes", [])
    if not isinstance(knobs, list) or not isinstance(pads, list):
        raise FlowError(f"{where}: \"cc\" and \"notes\" must be lists")
    try:
        mapping = MidiMap(tuple(_knob(e, f"{where}: cc[{i}]") for i, e in enumerate(knobs)),
                          tuple(_pad(e, f"{where}: notes[{i}]") for i, e in enumerate(pads)))
    except ControlError as exc:
        raise FlowError(str(exc)) from None
    for kind, seen in (("cc", [(b.cc, b.channel) for b in mapping.cc]),
                       ("note", [(b.note, b.channel) for b in mapping.notes])):
        twice = {s for s in seen if seen.count(s) > 1}
        if twice:
            number, channel = sorted(twice, key=str)[0]
            raise FlowError(f"{where}: {kind} {number} on {'any channel' if channel is None else f'channel {channel}'}"
                            f" is bound twice; keep one")
    return mapping


def _knob(e: object, where: str) -> CCBinding:
    if not isinstance(e, dict) or not {"cc", "control", "min", "max"} <= set(e) or \
            set(e) - {"cc", "channel", "control", "index", "min", "max", "curve"}:
        raise ControlError(f"{where}: a knob is {{\"cc\": 0..127, \"control\": NAME, \"min\": x, \"max\": y}} "
                           f"(optional \"channel\" 1..16, \"index\", \"curve\" {'|'.join(CURVES)}), got {e!r}")
    cc, channel = _midi_number(e["cc"], "cc", where), _channel(e.get("channel"), where)
    try:
        control, index = parse_target(e["control"])
    except ControlError as exc:
        raise ControlError(f"{where}: {exc}") from None
    if index is not None:
        raise ControlError(f"{where}: put the element in \"index\", not in the control's name")
    if "index" in e:
        if control not in VECTORS:
            raise ControlError(f"{where}: only {', '.join(VECTORS)} take an index")
        index = _index(e["index"], control, where)
    lo, hi, curve = e["min"], e["max"], e.get("curve", "linear")
    for end in (lo, hi):
        if not (end == WINDOW and control == "context_chunks") and (
                isinstance(end, bool) or not isinstance(end, (int, float))):
            raise ControlError(f"{where}: min and max are numbers (\"window\" for context_chunks), got {end!r}")
    if curve not in CURVES:
        raise ControlError(f"{where}: curve must be one of {', '.join(CURVES)}, got {curve!r}")
    if curve == "exp" and not all(end == WINDOW or end > 0 for end in (lo, hi)):
        raise ControlError(f"{where}: an exp curve needs min and max above 0, got {lo!r} and {hi!r}")
    return CCBinding(cc, control, lo, hi, curve, channel, index)


def _pad(e: object, where: str) -> NoteBinding:
    if not isinstance(e, dict) or not {"note", "command"} <= set(e) or set(e) - {"note", "channel", "command"} \
            or not isinstance(e["command"], dict):
        raise ControlError(f"{where}: a pad is {{\"note\": 0..127, \"command\": {{...a JSON protocol command...}}}} "
                           f"(optional \"channel\" 1..16), got {e!r}")
    return NoteBinding(_midi_number(e["note"], "note", where), e["command"], _channel(e.get("channel"), where))


def _midi_number(v, what: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 127:
        raise ControlError(f"{where}: {what} must be an integer 0..127, got {v!r}")
    return v


def _channel(v, where: str) -> int | None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 16):
        raise ControlError(f"{where}: channel must be 1..16 (or left out for any), got {v!r}")
    return v


def load_map(path: str | Path | None) -> MidiMap:
    """The mapping in `path`; DEFAULT_MAP when no path is given or the file does not exist yet (learn creates it)."""
    if path is None or not Path(path).exists():
        return DEFAULT_MAP
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise FlowError(f"{path}: cannot read the MIDI map ({getattr(exc, 'strerror', None) or exc})") from None
    except ValueError as exc:
        raise FlowError(f"{path}: not valid JSON ({exc}); see the README's MIDI section for the format") from None
    return parse_map(data, str(path))


def save_map(mapping: MidiMap, path: str | Path) -> None:
    write_text_atomic(json.dumps(mapping.to_json(), indent=2) + "\n", path)


def check_map(mapping: MidiMap, limits: Limits, where: str) -> None:
    """Refuse a mapping whose knobs (at 0 and at 127) or pads send what the stream would refuse."""
    start = limits.initial
    for b in mapping.cc:
        for value in (0, 127):
            try:
                apply_message(start, knob_command(b, value, start, limits.window), limits)
            except ControlError as exc:
                raise FlowError(f"{where}: cc {b.cc} ({b.target}) at {value}: {exc}") from None
    for p in mapping.notes:
        try:
            apply_message(start, p.command, limits)
        except ControlError as exc:
            raise FlowError(f"{where}: note {p.note}: {exc}") from None
