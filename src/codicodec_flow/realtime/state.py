"""Live controls: the typed state a stream runs with, and the pure, validated way commands change it.

Every control surface (keys, the JSON protocol over stdin, TCP, WebSocket, OSC) produces the same
command dicts and goes through `apply_message`, so validation lives in one place: a bad message
raises ControlError and the state is untouched (a message is applied all or nothing).

Command forms (one JSON object each; several keys in one message apply together):
    {"set": {"temperature": 0.8, "solver": "heun"}}   absolute values; out of range is an error
    {"temperature": 0.8}                              shorthand for set, for any control name
    {"add": {"temperature": -0.1, "context_chunks": 1}}  relative nudges, clamped to the range
    {"token_scale": [8 numbers]} / {"channel_bias": {"index": 3, "value": 0.5}}  whole vector or one element
    {"gain": 0.8} {"crossfade_chunks": 4} {"auto_cycle": 32}   controls too (auto_cycle 0 is off)
    {"seed": 123, "mode": "crossfade" | "cut"}        new noise stream ("random" picks one)
    {"lfo": {"id": "wobble", "target": "temperature", "shape": "sine", "rate": 8, "unit": "chunks",
             "depth": 0.3}}                           add or change an LFO (a list changes several)
    {"lfo": {"id": "wobble", "remove": true}}
    {"preset": {"save": "name"}} / {"preset": {"recall": "name", "morph_chunks": 16}} / {"preset": {"delete": "name"}}
    {"randomise": {"what": "tokens" | "channels" | "both", "spread": 0.5}}   (optional "seed", "morph_chunks")
    {"morph_chunks": 8, "set": {...}}                 glide the numbers a message changes over 8 chunks
    {"events": {"waveform": true, "latents": true, "max_rate_hz": 10}}        opt-in display events
    {"reset": "steering" | "lfos" | "all"}            steering = the scale/bias vectors; all = everything but
                                                      the seed and the display events
    {"get": "state" | "info"} / {"help": true} / {"quit": true}
    {"midi_learn": "temperature"}                     bind the next MIDI knob moved (midi.py; needs --midi)
What a chunk is generated with is `modulate(controls, index)`: the set values, morphed and LFO'd
(modulation.py); the controls themselves stay what the user set.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, replace

from ..codec import LATENT_DIM, TOKENS_PER_CHUNK
from ..config import LIVE_SAMPLING
from ..errors import FlowError
from ..solvers import SOLVERS, get_solver, steps_for
from .checks import ControlError, is_int as _is_int, is_number as _is_number, number as _number, show as _show
from .modulation import MAX_LFOS, MAX_PERIOD_CHUNKS, MIN_PERIOD_CHUNKS, SHAPES, UNITS, Lfo, Morph, modulated, \
    parse_lfos, unit_randoms
from .presets import name_problem

NFE_PRESETS = (1, 2, 4, 8)  # the number keys 1..4
SEED_MODES = ("crossfade", "cut")
RESET_WHAT = ("steering", "lfos", "all")
GET_WHAT = ("state", "info")
RANDOMISE_WHAT = ("tokens", "channels", "both")
MAX_SEED = 2**63 - 1
MAX_GAIN = 2.0  # +6 dB; a limiter keeps whatever this does to loud chunks under full scale
MAX_SPREAD = 2.0
MAX_MORPH_CHUNKS = 10_000
VECTORS = {"token_scale": TOKENS_PER_CHUNK, "token_bias": TOKENS_PER_CHUNK,
           "channel_scale": LATENT_DIM, "channel_bias": LATENT_DIM}
# inclusive ranges; steering is in normalised latent units (the model's own unit-variance space)
RANGES = {"nfe": (1, 64), "temperature": (0.0, 4.0), "cfg_scale": (0.0, 10.0), "gain": (0.0, MAX_GAIN),
          "crossfade_chunks": (1, 64), "auto_cycle": (0, 100_000), **{name: (-4.0, 4.0) for name in VECTORS}}
INTEGERS = ("nfe", "context_chunks", "crossfade_chunks", "auto_cycle")
MODULATED = ("nfe", "temperature", "cfg_scale", "context_chunks", "gain", *VECTORS)  # what LFOs and morphs move
COMMANDS = ("set", "add", "seed", "mode", "reset", "get", "help", "quit", "lfo", "preset", "randomise",
            "morph_chunks", "events", "midi_learn")


@dataclass(frozen=True)
class EventOptions:
    """Which display events the engine sends besides "chunk", and how often at most."""
    waveform: bool = False  # a min/max envelope of each chunk's audio
    latents: bool = False  # each chunk's 8 x 64 latent grid
    max_rate_hz: float = 10.0  # per kind; chunks in between are skipped (they come ~1.5 per second live)


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
    gain: float = 1.0  # output level, 0..MAX_GAIN
    crossfade_chunks: int = 4  # length of a seed crossfade
    auto_cycle: int = 0  # a new seed (crossfaded) every this many chunks; 0: off
    lfos: tuple[Lfo, ...] = ()
    morph: Morph | None = None  # a glide in progress
    events: EventOptions = field(default_factory=EventOptions)

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

    def preset_json(self) -> dict:
        """What a preset keeps: every settable control and the LFOs."""
        return {**{k: list(v) if isinstance(v, tuple) else v for k in _SETTABLE for v in (getattr(self, k),)},
                "lfos": [lfo.to_json() for lfo in self.lfos]}

    def to_json(self) -> dict:
        return {**self.preset_json(), "morph": self.morph.to_json() if self.morph else None,
                "events": asdict(self.events), "steps": self.steps, "evals": self.evals}

    def modulated_json(self) -> dict:
        """The values LFOs and morphs move, as this chunk used them."""
        return {k: list(v) if isinstance(v, tuple) else v for k in MODULATED for v in (getattr(self, k),)}


SETTABLE = tuple(k for k in Controls.__dataclass_fields__ if k not in ("lfos", "morph", "events"))
_SETTABLE = SETTABLE  # every control that can be set by name


@dataclass(frozen=True)
class Limits:
    """What the running stream can accept: the checkpoint's window, the values reset goes back to, and the
    preset store (anything with names(), get(name) -> dict | None; None: presets are off)."""
    window: int  # W, the largest context the model was trained with
    initial: Controls = field(default_factory=Controls)
    presets: object | None = None


@dataclass(frozen=True)
class Update:
    """The result of one message: the new controls and what else it asks for."""
    controls: Controls
    seed_mode: str | None = None  # set when the message changed the seed
    quit: bool = False
    get: str | None = None  # "state" or "info"
    help: bool = False
    save: str | None = None  # a preset to save the new controls as
    delete: str | None = None  # a preset to delete
    midi_learn: str | None = None  # bind the next MIDI knob moved to this control (midi.py checks the name)


def modulate(c: Controls, index: int, window: int) -> Controls:
    """The controls chunk `index` is generated with: c's set values, morphed and LFO'd (modulation.py)."""
    if c.morph is None and not any(lfo.on for lfo in c.lfos):
        return c
    values = {k: getattr(c, k) for k in MODULATED}
    return replace(c, **modulated(values, c.morph, c.lfos, index, {**RANGES, "context_chunks": (1, window)},
                                  INTEGERS))


def apply_message(c: Controls, msg: object, limits: Limits, now: int = 0) -> Update:
    """Apply one decoded JSON message to c; ControlError (and no change) if any part of it is invalid.

    now: the index of the next chunk, where a morph the message starts begins."""
    if not isinstance(msg, dict) or not msg:
        raise ControlError(f"a control message must be a non-empty JSON object, got {_show(msg)}")
    unknown = [k for k in msg if k not in COMMANDS and k not in _SETTABLE]
    if unknown:
        raise ControlError(f"unknown command {unknown[0]!r}: use one of {', '.join(COMMANDS)} or a control name "
                           f"({', '.join(_SETTABLE)})")
    before, changes, morph_chunks = c, {}, _morph_chunks(msg.get("morph_chunks", 0), "morph_chunks")
    if "reset" in msg:
        what = msg["reset"]
        if what not in RESET_WHAT:
            raise ControlError(f"reset expects one of {', '.join(RESET_WHAT)}, got {_show(what)}")
        if what == "all":
            c = replace(limits.initial, seed=c.seed, events=c.events)
        elif what == "lfos":
            c = replace(c, lfos=())
        else:
            c = replace(c, **{k: getattr(limits.initial, k) for k in VECTORS})
    save = delete = None
    if "preset" in msg:
        c, save, delete, n = _preset(c, msg["preset"], limits)
        morph_chunks = max(morph_chunks, n)
    if "randomise" in msg:
        c, n = _randomise(c, msg["randomise"])
        morph_chunks = max(morph_chunks, n)
    sets = _object(msg.get("set", {}), "set")
    sets.update({k: v for k, v in msg.items() if k in _SETTABLE})
    for name, value in sets.items():
        changes[name] = _absolute(c, name, value, limits)
    for name, delta in _object(msg.get("add", {}), "add").items():
        changes[name] = _relative(replace(c, **changes), name, delta, limits)
    if "lfo" in msg:
        changes["lfos"] = _lfos(c.lfos, msg["lfo"], limits.window)
    if "events" in msg:
        changes["events"] = _events(c.events, msg["events"])
    c = replace(c, **changes)
    c = replace(c, morph=_glide(before, c, morph_chunks, now, limits.window))
    if "mode" in msg and "seed" not in changes:
        raise ControlError('"mode" goes with "seed", e.g. {"seed": 7, "mode": "cut"}')
    seed_mode = None
    if "seed" in changes or c.seed != before.seed:
        seed_mode = msg.get("mode", "crossfade")
        if seed_mode not in SEED_MODES:
            raise ControlError(f"mode must be one of {', '.join(SEED_MODES)}, got {_show(seed_mode)}")
    for flag in ("quit", "help"):
        if flag in msg and msg[flag] is not True:
            raise ControlError(f'{{"{flag}": true}} is the only form of {flag}, got {_show(msg[flag])}')
    if "get" in msg and msg["get"] not in GET_WHAT:
        raise ControlError(f'{{"get": "state"}} and {{"get": "info"}} are the queries, got {_show(msg["get"])}')
    learn = msg.get("midi_learn")
    if "midi_learn" in msg:
        _learn_target(learn)
    return Update(c, seed_mode, quit="quit" in msg, get=msg.get("get"), help="help" in msg, save=save, delete=delete,
                  midi_learn=learn)


def _learn_target(target) -> None:
    """ControlError unless MIDI learn can bind a knob to `target`: checked here, with the rest of the message, so a
    message that also saves a preset is refused before anything is written (the engine arms learning last)."""
    if not isinstance(target, str):
        raise ControlError(f'{{"midi_learn": "temperature"}} names the control the next MIDI knob moved drives, '
                           f"got {_show(target)}")
    from .midi_map import learn_range, parse_target  # here: midi_map builds on this module
    learn_range(parse_target(target)[0])


def describe(limits: Limits) -> dict:
    """Every control and command with its type, range and start value: what a front end can be generated from."""
    init, controls = limits.initial, {}
    for name in _SETTABLE:
        start = getattr(init, name)
        entry: dict = {"start": list(start) if isinstance(start, tuple) else start}
        if name in VECTORS:
            entry.update(type="vector", length=VECTORS[name], range=list(RANGES[name]))
        elif name == "solver":
            entry.update(type="choice", choices=list(SOLVERS))
        elif name == "seed":
            entry.update(type="integer", range=[0, MAX_SEED], also=["random"])
        else:
            entry.update(type="integer" if name in INTEGERS else "number",
                         range=[1, limits.window] if name == "context_chunks" else list(RANGES[name]))
        entry["modulatable"] = name in MODULATED
        controls[name] = entry
    presets = limits.presets
    return {"controls": controls,
            "lfo": {"targets": list(MODULATED), "shapes": list(SHAPES), "units": list(UNITS), "max": MAX_LFOS,
                    "period_chunks": [MIN_PERIOD_CHUNKS, MAX_PERIOD_CHUNKS],
                    "fields": {"id": "1..32 of A-Z a-z 0-9 _ -", "target": "a modulatable control",
                               "index": "one element of a vector target (else all)", "shape": "see shapes",
                               "rate": "the length of one cycle, in unit", "unit": "see units",
                               "depth": "swing in the target's units (base +- depth, clamped to its range)",
                               "phase": "0..1", "on": "true/false", "seed": "random-hold values",
                               "remove": "true: delete this LFO"}},
            "randomise": {"what": list(RANDOMISE_WHAT), "spread": [0.0, MAX_SPREAD],
                          "effect": "scale = 1 + spread * u, bias = spread * u, u uniform in [-1, 1]"},
            "morph_chunks": [0, MAX_MORPH_CHUNKS], "seed_modes": list(SEED_MODES), "reset": list(RESET_WHAT),
            "get": list(GET_WHAT), "events": {"waveform": "bool", "latents": "bool", "max_rate_hz": [0.1, 100.0]},
            "presets": presets.names() if presets is not None else None}


def _glide(before: Controls, after: Controls, chunks: int, now: int, window: int) -> Morph | None:
    """The morph after a message: with chunks > 0 the numbers it changed glide from where they sound now (a glide
    in progress included); with 0 they jump, leaving any other glide in progress going."""
    old = after.morph if after.morph is not None and not after.morph.done(now - 1) else None
    changed = [k for k in MODULATED if getattr(after, k) != getattr(before, k)]
    if chunks == 0:
        kept = tuple((k, v) for k, v in old.source if k not in changed) if old else ()
        return replace(old, source=kept) if kept else None
    heard = modulate(replace(before, lfos=()), now - 1, window)  # where each value is now, without the LFOs
    fields = [k for k in MODULATED if k in changed or (old and k in dict(old.source))]
    source = tuple((k, getattr(heard, k)) for k in fields if getattr(heard, k) != getattr(after, k))
    return Morph(now, chunks, source) if source else None


def _preset(c: Controls, spec, limits: Limits) -> tuple[Controls, str | None, str | None, int]:
    forms = '{"save": NAME}, {"recall": NAME, "morph_chunks": N} or {"delete": NAME}'
    if not isinstance(spec, dict) or len(set(spec) & {"save", "recall", "delete"}) != 1 or \
            set(spec) - {"save", "recall", "delete", "morph_chunks"}:
        raise ControlError(f"preset takes {forms}, got {_show(spec)}")
    (verb,) = set(spec) & {"save", "recall", "delete"}
    if "morph_chunks" in spec and verb != "recall":
        raise ControlError("morph_chunks goes with a preset recall")
    name = spec[verb]
    problem = name_problem(name)
    if problem:
        raise ControlError(problem)
    store = limits.presets
    if store is None:
        raise ControlError("presets are off in this session")
    if verb == "save":
        return c, name, None, 0
    try:
        data = store.get(name)
    except FlowError as exc:
        raise ControlError(str(exc)) from None
    if data is None:
        saved = store.names()
        raise ControlError(f"no preset named {name!r}; saved: {', '.join(saved) if saved else 'none yet'} "
                           f'(save one with {{"preset": {{"save": "{name}"}}}})')
    if verb == "delete":
        return c, None, name, 0
    return _recall(c, name, data, limits), None, None, _morph_chunks(spec.get("morph_chunks", 0), "morph_chunks")


def _recall(c: Controls, name: str, data: dict, limits: Limits) -> Controls:
    """c with preset `data` applied, every value checked as a command's would be (a preset saved with a larger
    window is clamped to this checkpoint's)."""
    bad = [k for k in data if k not in _SETTABLE and k != "lfos"]
    if bad:
        raise ControlError(f"preset {name!r}: unknown control {bad[0]!r}; save it again")
    values = dict(data)
    if _is_int(values.get("context_chunks")):
        values["context_chunks"] = min(values["context_chunks"], limits.window)
    try:
        out = replace(c, lfos=())
        out = replace(out, **{k: _absolute(out, k, values[k], limits) for k in _SETTABLE if k in values})
        return replace(out, lfos=_lfos((), values.get("lfos", []), limits.window))
    except ControlError as exc:
        raise ControlError(f"preset {name!r}: {exc}") from None


def _randomise(c: Controls, spec) -> tuple[Controls, int]:
    if not isinstance(spec, dict) or set(spec) - {"what", "spread", "seed", "morph_chunks"}:
        raise ControlError(f'randomise takes {{"what": "tokens|channels|both", "spread": 0.5}} (optional "seed", '
                           f'"morph_chunks"), got {_show(spec)}')
    what, spread = spec.get("what", "both"), spec.get("spread", 0.5)
    if what not in RANDOMISE_WHAT:
        raise ControlError(f"randomise what must be one of {', '.join(RANDOMISE_WHAT)}, got {_show(what)}")
    if not _is_number(spread) or not 0 < spread <= MAX_SPREAD:
        raise ControlError(f"randomise spread must be a number in (0, {MAX_SPREAD}], got {_show(spread)}")
    seed = spec.get("seed", None)
    if seed is None:
        seed = random.randrange(2**31)
    elif not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ControlError(f"randomise seed must be an integer 0..2^63-1, got {_show(seed)}")
    lo, hi = RANGES["token_scale"]
    out = {}
    for name in VECTORS:
        if what == "both" or name.startswith(what[:-1]):
            centre = 1.0 if name.endswith("scale") else 0.0
            out[name] = tuple(round(min(hi, max(lo, centre + spread * u)), 3)
                              for u in unit_randoms(f"{seed}/{name}", VECTORS[name]))
    return replace(c, **out), _morph_chunks(spec.get("morph_chunks", 0), "randomise morph_chunks")


def _events(old: EventOptions, spec) -> EventOptions:
    if not isinstance(spec, dict) or not spec or set(spec) - {"waveform", "latents", "max_rate_hz"}:
        raise ControlError(f'events takes {{"waveform": true, "latents": true, "max_rate_hz": 10}} (any of them), '
                           f"got {_show(spec)}")
    for k in ("waveform", "latents"):
        if k in spec and not isinstance(spec[k], bool):
            raise ControlError(f"events {k} must be true or false, got {_show(spec[k])}")
    rate = spec.get("max_rate_hz", old.max_rate_hz)
    if not _is_number(rate) or not 0.1 <= rate <= 100:
        raise ControlError(f"events max_rate_hz must lie in [0.1, 100], got {_show(rate)}")
    return replace(old, **{k: v for k, v in spec.items() if k != "max_rate_hz"}, max_rate_hz=float(rate))


def _morph_chunks(value, what: str) -> int:
    if not _is_int(value) or not 0 <= value <= MAX_MORPH_CHUNKS:
        raise ControlError(f"{what} must be an integer 0..{MAX_MORPH_CHUNKS} (0: at once), got {_show(value)}")
    return value


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
    if name in INTEGERS and not _is_int(value):
        lo, hi = RANGES[name]
        raise ControlError(f"{name} must be an integer {lo}..{hi}, got {_show(value)}")
    return _check_range(name, value)


def _relative(c: Controls, name: str, delta, limits: Limits):
    """Nudges clamp at the limits (a key held at the end of a range does nothing) instead of failing."""
    if name in ("solver", "seed"):
        raise ControlError(f"{name} cannot be nudged with add; use set")
    if name in VECTORS:
        lo, hi = RANGES[name]
        return _vector(getattr(c, name), name, delta, lambda old, d: round(min(hi, max(lo, old + _number(name, d))), 6))
    lo, hi = (1, limits.window) if name == "context_chunks" else RANGES[name]
    if name in INTEGERS and not _is_int(delta):
        raise ControlError(f"add {name} expects an integer step, got {_show(delta)}")
    value = min(hi, max(lo, getattr(c, name) + _number(name, delta)))
    return value if name in INTEGERS else round(float(value), 6)  # no 0.30000000000000004


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
    return v if name in INTEGERS else float(v)


def _object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise ControlError(f'{what} expects an object of control names, e.g. {{"{what}": {{"temperature": 0.9}}}}, '
                           f"got {_show(value)}")
    bad = [k for k in value if k not in _SETTABLE]
    if bad:
        raise ControlError(f"{what}: unknown control {bad[0]!r}; choose from {', '.join(_SETTABLE)}")
    return dict(value)


def _lfos(lfos: tuple[Lfo, ...], spec, window: int) -> tuple[Lfo, ...]:
    ranges = {k: (1, window) if k == "context_chunks" else RANGES[k] for k in MODULATED}
    return parse_lfos(lfos, spec, ranges, VECTORS)
