"""Modulation on top of the controls a user set: LFOs and morphs, as pure functions of the chunk index.

The controls a user sets (state.Controls) stay what they are; each chunk k is generated with
`modulate(c, k)`: first a morph in progress glides the fields it covers from where they were when it
started towards their set values, then every LFO that is on adds depth * wave(k) to its target, and
the result is clamped to the target's range. Nothing here keeps state between chunks, so the value a
chunk gets is fixed by the controls and its index alone (tests can assert it exactly, and a stream
replayed from the same commands modulates the same way).

LFO waves, in [-1, 1], with phase p = k / period + phase0 (period in chunks; seconds are converted
with the chunk length) and f = p mod 1:
    sine         sin(2 pi f)
    triangle     0 at f = 0, 1 at 1/4, -1 at 3/4
    square       1 for f < 1/2, else -1
    random-hold  one uniform value in [-1, 1] per cycle floor(p), from a hash of (seed, id, cycle)
A morph over n chunks started at chunk s gives chunk k the fraction (k - s + 1) / n of the way (clamped
to [0, 1]): its first chunk already moves, its n-th arrives.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, replace

from ..codec import CHUNK_SECONDS
from .checks import ControlError, is_int, number, show

SHAPES = ("sine", "triangle", "square", "random-hold")
UNITS = ("chunks", "seconds")
MAX_LFOS = 16
MIN_PERIOD_CHUNKS = 2.0  # one value per chunk: a faster wave would alias into a slower one
MAX_PERIOD_CHUNKS = 100_000.0  # ~19 h
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,32}")
MAX_SEED = 2**63 - 1
LFO_KEYS = ("id", "target", "index", "shape", "rate", "unit", "depth", "phase", "on", "seed", "remove")


@dataclass(frozen=True)
class Lfo:
    """One low-frequency oscillator: target (+ element index for a vector), shape, period, depth, phase, on/off."""
    id: str
    target: str
    index: int | None = None  # one element of a vector target; None: every element alike (or a scalar)
    shape: str = "sine"
    rate: float = 16.0  # the length of one cycle, in `unit`
    unit: str = "chunks"
    depth: float = 0.0  # in the target's own units: the value swings base +- depth
    phase: float = 0.0  # 0..1, where in its cycle the wave is at chunk 0
    on: bool = True
    seed: int = 0  # random-hold's values

    @property
    def period_chunks(self) -> float:
        return self.rate if self.unit == "chunks" else self.rate / CHUNK_SECONDS

    def wave(self, index: int) -> float:
        """The wave at chunk `index`, in [-1, 1]."""
        pos = index / self.period_chunks + self.phase
        cycle = math.floor(pos)
        f = pos - cycle
        if self.shape == "sine":
            return math.sin(2 * math.pi * f)
        if self.shape == "triangle":
            return 1.0 - 4.0 * abs((f + 0.25) % 1.0 - 0.5)
        if self.shape == "square":
            return 1.0 if f < 0.5 else -1.0
        return _unit_random(f"{self.seed}/{self.id}/{cycle}")

    def offset(self, index: int) -> float:
        return self.depth * self.wave(index) if self.on else 0.0

    def to_json(self) -> dict:
        return {"id": self.id, "target": self.target, "index": self.index, "shape": self.shape, "rate": self.rate,
                "unit": self.unit, "depth": self.depth, "phase": self.phase, "on": self.on, "seed": self.seed}


@dataclass(frozen=True)
class Morph:
    """A glide of some fields from `source` values (at chunk `start`) to the controls' set values over `chunks`."""
    start: int
    chunks: int
    source: tuple[tuple[str, float | int | tuple[float, ...]], ...]  # (field, value it glides from)

    def progress(self, index: int) -> float:
        return min(1.0, max(0.0, (index - self.start + 1) / self.chunks))

    def done(self, index: int) -> bool:
        """True from the chunk that arrives (and every later one)."""
        return index - self.start + 1 >= self.chunks

    def to_json(self) -> dict:
        return {"start": self.start, "chunks": self.chunks, "fields": [name for name, _ in self.source]}


def lerp(a, b, w: float, integer: bool = False):
    """a + w (b - a) for numbers or equal-length tuples; integers round to the nearest."""
    if isinstance(a, tuple):
        return tuple(round(x + w * (y - x), 6) for x, y in zip(a, b))
    v = a + w * (b - a)
    return int(round(v)) if integer else round(v, 6)


def modulated(values: dict, morph: Morph | None, lfos: tuple[Lfo, ...], index: int,
              ranges: dict[str, tuple[float, float]], integers: tuple[str, ...]) -> dict:
    """The values chunk `index` is generated with: `values` (field -> set value) morphed, then LFO'd, clamped.

    Returns only the fields that changed (a dict to `replace` into the controls)."""
    out: dict = {}
    if morph is not None:
        w = morph.progress(index)
        for name, src in morph.source:
            if name in values:
                out[name] = lerp(src, values[name], w, name in integers)
    offsets: dict[str, float | list[float]] = {}
    for lfo in lfos:
        if not lfo.on or lfo.target not in values:
            continue
        d = lfo.offset(index)
        base = out.get(lfo.target, values[lfo.target])
        if isinstance(base, tuple):
            acc = offsets.setdefault(lfo.target, [0.0] * len(base))
            for i in (range(len(base)) if lfo.index is None else (lfo.index,)):
                acc[i] += d
        else:
            offsets[lfo.target] = offsets.get(lfo.target, 0.0) + d
    for name, d in offsets.items():
        lo, hi = ranges[name]
        base = out.get(name, values[name])
        if isinstance(base, tuple):
            out[name] = tuple(round(min(hi, max(lo, b + x)), 6) for b, x in zip(base, d))
        elif name in integers:
            out[name] = int(min(hi, max(lo, round(base + d))))
        else:
            out[name] = round(min(hi, max(lo, base + d)), 6)
    return out


def _unit_random(key: str) -> float:
    """A uniform number in [-1, 1] fixed by key (the same on every machine and Python version)."""
    n = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return n / (2**64 - 1) * 2.0 - 1.0


def derived_seed(seed: int, index: int) -> int:
    """The seed auto-cycling moves to at chunk `index`: fixed by the seed before it and the index."""
    return int.from_bytes(hashlib.blake2b(f"{seed}@{index}".encode(), digest_size=4).digest(), "big") >> 1


def unit_randoms(key: str, n: int) -> list[float]:
    """n uniform numbers in [-1, 1] fixed by key (randomised steering with a given seed)."""
    return [_unit_random(f"{key}/{i}") for i in range(n)]


def parse_lfos(lfos: tuple[Lfo, ...], spec, ranges: dict[str, tuple[float, float]],
               sizes: dict[str, int]) -> tuple[Lfo, ...]:
    """The LFOs after one {"lfo": ...} (an object, or a list of them applied in order); ControlError if any is bad.

    ranges: every target an LFO may move -> its (lo, hi); sizes: the vector targets -> their length."""
    items = spec if isinstance(spec, list) else [spec]
    out = list(lfos)
    for item in items:
        if not isinstance(item, dict) or "id" not in item:
            raise ControlError(f'lfo takes {{"id": NAME, "target": ..., "depth": ...}} (or a list of them), got '
                               f"{show(item)}")
        bad = [k for k in item if k not in LFO_KEYS]
        if bad:
            raise ControlError(f"lfo: unknown field {bad[0]!r}; fields: {', '.join(LFO_KEYS)}")
        lfo_id = item["id"]
        if not isinstance(lfo_id, str) or not ID_PATTERN.fullmatch(lfo_id):
            raise ControlError(f"lfo id must be 1..32 letters, digits, '_' or '-', got {show(lfo_id)}")
        at = next((i for i, old in enumerate(out) if old.id == lfo_id), None)
        if "remove" in item:
            if item["remove"] is not True or set(item) != {"id", "remove"}:
                raise ControlError(f'remove an LFO with {{"id": "{lfo_id}", "remove": true}} alone')
            if at is None:
                raise ControlError(f"no LFO {lfo_id!r} to remove; running: {', '.join(o.id for o in out) or 'none'}")
            del out[at]
            continue
        if at is None and ("target" not in item or "depth" not in item):
            raise ControlError(f'a new LFO needs a target and a depth, e.g. {{"id": "{lfo_id}", '
                               f'"target": "temperature", "depth": 0.2}}')
        lfo = _checked(out[at] if at is not None else Lfo(lfo_id, item["target"]), item, ranges, sizes)
        if at is not None:
            out[at] = lfo
        elif len(out) >= MAX_LFOS:
            raise ControlError(f"at most {MAX_LFOS} LFOs; remove one first")
        else:
            out.append(lfo)
    return tuple(out)


def _checked(old: Lfo, item: dict, ranges: dict[str, tuple[float, float]], sizes: dict[str, int]) -> Lfo:
    """old with the fields of one LFO message applied, each checked."""
    target = item.get("target", old.target)
    if target not in ranges:
        raise ControlError(f"lfo target must be one of {', '.join(ranges)}, got {show(target)}")
    index = item.get("index", old.index if target == old.target else None)
    if index is not None:
        if target not in sizes:
            raise ControlError(f"lfo index applies to {', '.join(sizes)} only")
        if not is_int(index) or not 0 <= index < sizes[target]:
            raise ControlError(f"lfo index for {target} must be an integer 0..{sizes[target] - 1}, got {show(index)}")
    shape, unit = item.get("shape", old.shape), item.get("unit", old.unit)
    if shape not in SHAPES:
        raise ControlError(f"lfo shape must be one of {', '.join(SHAPES)}, got {show(shape)}")
    if unit not in UNITS:
        raise ControlError(f"lfo unit must be one of {', '.join(UNITS)}, got {show(unit)}")
    rate = float(number("lfo rate", item.get("rate", old.rate)))
    lfo = Lfo(old.id, target, index, shape, rate, unit)
    if not MIN_PERIOD_CHUNKS <= lfo.period_chunks <= MAX_PERIOD_CHUNKS:
        raise ControlError(f"lfo rate is the length of one cycle: {MIN_PERIOD_CHUNKS:g}..{MAX_PERIOD_CHUNKS:g} "
                           f"chunks ({CHUNK_SECONDS:.3f} s each), got {rate:g} {unit}")
    lo, hi = ranges[target]
    depth = float(number("lfo depth", item.get("depth", old.depth)))
    if abs(depth) > hi - lo:
        raise ControlError(f"lfo depth for {target} must lie in [{lo - hi:g}, {hi - lo:g}], got {depth:g}")
    phase = float(number("lfo phase", item.get("phase", old.phase)))
    if not 0 <= phase <= 1:
        raise ControlError(f"lfo phase must lie in [0, 1], got {phase:g}")
    on, seed = item.get("on", old.on), item.get("seed", old.seed)
    if not isinstance(on, bool):
        raise ControlError(f"lfo on must be true or false, got {show(on)}")
    if not is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ControlError(f"lfo seed must be an integer 0..2^63-1, got {show(seed)}")
    return replace(lfo, depth=depth, phase=phase, on=on, seed=seed)
