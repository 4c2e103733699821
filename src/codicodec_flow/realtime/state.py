"""Live controls: the typed state a stream runs with, and the pure, validated way commands change it.

Every control surface (keys, the JSON protocol over stdin or TCP) produces the same command dicts
and goes through `apply_message`, so validation lives in one place: a bad message raises
ControlError and the state is untouched (a message is applied all or nothing).

Command forms (one JSON object each; several keys in one message apply together):
    {"set": {"temperature": 0.8, "solver": "heun"}}   absolute values; out of range is an error
    {"temperature": 0.8}                              shorthand for set, for any control name
    {"add": {"temperature": -0.1, "context_chunks": 1}}  relative nudges, clamped to the range
    {"token_scale": [8 numbers]} / {"channel_bias": {"index": 3, "value": 0.5}}  whole vector or one element
    {"seed": 123, "mode": "crossfade" | "cut"}        new noise stream ("random" picks one)
    {"reset": "steering" | "all"}                     steering = the scale/bias vectors; all = everything but the seed
    {"get": "state"} / {"help": true} / {"quit": true}
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, replace

from ..codec import LATENT_DIM, TOKENS_PER_CHUNK
from ..config import LIVE_SAMPLING
from ..errors import FlowError
from ..solvers import SOLVERS, get_solver, steps_for

NFE_PRESETS = (1, 2, 4, 8)  # the number keys 1..4
SEED_MODES = ("crossfade", "cut")
RESET_WHAT = ("steering", "all")
MAX_SEED = 2**63 - 1
VECTORS = {"token_scale": TOKENS_PER_CHUNK, "token_bias": TOKENS_PER_CHUNK,
           "channel_scale": LATENT_DIM, "channel_bias": LATENT_DIM}
# inclusive ranges; steering is in normalised latent units (the model's own unit-variance space)
RANGES = {"nfe": (1, 64), "temperature": (0.0, 4.0), "cfg_scale": (0.0, 10.0),
          **{name: (-4.0, 4.0) for name in VECTORS}}
COMMANDS = ("set", "add", "seed", "mode", "reset", "get", "help", "quit", "midi_learn")


class ControlError(FlowError):
    """A control message that is malformed or out of range; nothing was changed."""


@dataclass(frozen=True)
class Controls:
    """What the next chunk is generated with. Vectors are tuples so the state is hashable and immutable."""
    solver: str = LIVE_SAMPLING.solver
    nfe: int = LIVE_SAMPLING.nfe  # requested evaluations per chunk; rounded to whole solver steps (steps_for)
    temperature: float = LIVE_SAMPLING.temperature
    cfg_scale: float = LIVE_SAMPLING.cfg_scale
    context_chunks: int = 32  # attended window, 1..W of the checkpoint
    seed: int = LIVE_SAMPLING.seed
    token_scale: tuple[float, ...] = (1.0,) * TOKENS_PER_CHUNK  # (8,)
    token_bias: tuple[float, ...] = (0.0,) * TOKENS_PER_CHUNK  # (8,)
    channel_scale: tuple[float, ...] = (1.0,) * LATENT_DIM  # (64,)
    channel_bias: tuple[float, ...] = (0.0,) * LATENT_DIM  # (64,)

    @property
    def steps(self) -> int:
        """ODE steps per chunk: the requested NFE rounded to whole solver steps (solvers.steps_for)."""
        return steps_for(self.solver, self.nfe)

    @property
    def evals(self) -> int:
        """Model evaluations per chunk actually spent (before guidance doubles them)."""
        return self.steps * get_solver(self.solver).evals_per_step

    @property
    def steered(self) -> bool:
        return any(getattr(self, k) != getattr(Controls, k) for k in VECTORS)

    def to_json(self) -> dict:
        return {**{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()},
                "steps": self.steps, "evals": self.evals}


_SETTABLE = tuple(Controls.__dataclass_fields__)  # every control can be set by name


@dataclass(frozen=True)
class Limits:
    """What the running stream can accept: the checkpoint's window and the values reset goes back to."""
    window: int  # W, the largest context the model was trained with
    initial: Controls = field(default_factory=Controls)


@dataclass(frozen=True)
class Update:
    """The result of one message: the new controls and what else it asks for."""
    controls: Controls
    seed_mode: str | None = None  # set when the message changed the seed
    quit: bool = False
    get: bool = False
    help: bool = False
    midi_learn: str | None = None  # bind the next MIDI knob moved to this control (midi.py checks the name)


def apply_message(c: Controls, msg: object, limits: Limits) -> Update:
    """Apply one decoded JSON message to c; ControlError (and no change) if any part of it is invalid."""
    if not isinstance(msg, dict) or not msg:
        raise ControlError(f"a control message must be a non-empty JSON object, got {_show(msg)}")
    unknown = [k for k in msg if k not in COMMANDS and k not in _SETTABLE]
    if unknown:
        raise ControlError(f"unknown command {unknown[0]!r}: use one of {', '.join(COMMANDS)} or a control name "
                           f"({', '.join(_SETTABLE)})")
    changes: dict = {}
    if "reset" in msg:
        what = msg["reset"]
        if what not in RESET_WHAT:
            raise ControlError(f"reset expects one of {', '.join(RESET_WHAT)}, got {_show(what)}")
        keep = {"seed": c.seed} if what == "all" else {k: getattr(c, k) for k in _SETTABLE if k not in VECTORS}
        c = replace(limits.initial, **keep)
    sets = _object(msg.get("set", {}), "set")
    sets.update({k: v for k, v in msg.items() if k in _SETTABLE})
    for name, value in sets.items():
        changes[name] = _absolute(c, name, value, limits)
    for name, delta in _object(msg.get("add", {}), "add").items():
        changes[name] = _relative(replace(c, **changes), name, delta, limits)
    if "mode" in msg and "seed" not in changes:
        raise ControlError('"mode" goes with "seed", e.g. {"seed": 7, "mode": "cut"}')
    seed_mode = None
    if "seed" in changes:
        seed_mode = msg.get("mode", "crossfade")
        if seed_mode not in SEED_MODES:
            raise ControlError(f"mode must be one of {', '.join(SEED_MODES)}, got {_show(seed_mode)}")
    for flag in ("quit", "help"):
        if flag in msg and msg[flag] is not True:
            raise ControlError(f'{{"{flag}": true}} is the only form of {flag}, got {_show(msg[flag])}')
    if "get" in msg and msg["get"] != "state":
        raise ControlError(f'{{"get": "state"}} is the only query, got {_show(msg["get"])}')
    learn = msg.get("midi_learn")
    if "midi_learn" in msg and not isinstance(learn, str):
        raise ControlError(f'{{"midi_learn": "temperature"}} names the control the next MIDI knob moved drives, '
                           f"got {_show(learn)}")
    return Update(replace(c, **changes), seed_mode, quit="quit" in msg, get="get" in msg, help="help" in msg,
                  midi_learn=learn)


def _absolute(c: Controls, name: str, value, limits: Limits):
    if name in VECTORS:
        return _vector(getattr(c, name), name, value, lambda old, v: _check_range(name, v))
    if name == "solver":
        if not isinstance(value, str) or value not in SOLVERS:
            raise ControlError(f"unknown solver {_show(value)}: choose one of {', '.join(SOLVERS)}")
        return value
    if name == "seed":
        if value == "random":
            return random.randrange(2**31)  # short enough to read off the status line and note down
        if not _is_int(value) or not 0 <= value <= MAX_SEED:
            raise ControlError(f'seed must be an integer 0..2^63-1 or "random", got {_show(value)}')
        return value
    if name == "context_chunks":
        if not _is_int(value) or not 1 <= value <= limits.window:
            raise ControlError(f"context_chunks must be an integer 1..{limits.window} (the checkpoint's window), "
                               f"got {_show(value)}")
        return value
    if name == "nfe" and not _is_int(value):
        raise ControlError(f"nfe must be an integer {RANGES['nfe'][0]}..{RANGES['nfe'][1]}, got {_show(value)}")
    return _check_range(name, value)


def _relative(c: Controls, name: str, delta, limits: Limits):
    """Nudges clamp at the limits (a key held at the end of a range does nothing) instead of failing."""
    if name in ("solver", "seed"):
        raise ControlError(f"{name} cannot be nudged with add; use set")
    if name not in _SETTABLE:
        raise ControlError(f"add: unknown control {name!r}; choose from {', '.join(_SETTABLE)}")
    if name in VECTORS:
        lo, hi = RANGES[name]
        return _vector(getattr(c, name), name, delta, lambda old, d: round(min(hi, max(lo, old + _number(name, d))), 6))
    lo, hi = (1, limits.window) if name == "context_chunks" else RANGES[name]
    if name in ("nfe", "context_chunks") and not _is_int(delta):
        raise ControlError(f"add {name} expects an integer step, got {_show(delta)}")
    value = min(hi, max(lo, getattr(c, name) + _number(name, delta)))
    return value if name in ("nfe", "context_chunks") else round(float(value), 6)  # no 0.30000000000000004


def _vector(old: tuple, name: str, value, combine) -> tuple[float, ...]:
    """A whole list of the right length, one {"index", "value"} element, or one number for every element."""
    n = VECTORS[name]
    if isinstance(value, list):
        if len(value) != n:
            raise ControlError(f"{name} needs {n} numbers, got {len(value)}")
        return tuple(float(combine(o, v)) for o, v in zip(old, value))
    if isinstance(value, dict):
        if set(value) != {"index", "value"}:
            raise ControlError(f'{name} element form is {{"index": i, "value": x}}, got keys {sorted(value)}')
        i = value["index"]
        if not _is_int(i) or not 0 <= i < n:
            raise ControlError(f"{name} index must be an integer 0..{n - 1}, got {_show(i)}")
        return old[:i] + (float(combine(old[i], value["value"])),) + old[i + 1:]
    if _is_number(value):
        return tuple(float(combine(o, value)) for o in old)
    raise ControlError(f'{name} takes a list of {n} numbers, {{"index": i, "value": x}} or one number, '
                       f"got {_show(value)}")


def _check_range(name: str, value):
    lo, hi = RANGES[name]
    v = _number(name, value)
    if not lo <= v <= hi:
        raise ControlError(f"{name} must lie in [{lo}, {hi}], got {_show(value)}")
    return v if name == "nfe" else float(v)


def _number(name: str, value) -> float | int:
    if not _is_number(value):
        raise ControlError(f"{name} expects a finite number, got {_show(value)}")
    return value


def _object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise ControlError(f'{what} expects an object of control names, e.g. {{"{what}": {{"temperature": 0.9}}}}, '
                           f"got {_show(value)}")
    bad = [k for k in value if k not in _SETTABLE]
    if bad:
        raise ControlError(f"{what}: unknown control {bad[0]!r}; choose from {', '.join(_SETTABLE)}")
    return dict(value)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
