"""The small checks every control message goes through, and the error they raise (shared by state.py and
modulation.py, so a value is judged, and its error worded, the same way wherever it appears)."""
from __future__ import annotations

import math

from ..errors import FlowError


class ControlError(FlowError):
    """A control message that is malformed or out of range; nothing was changed."""


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def number(name: str, value) -> float | int:
    """value if it is a finite number, else ControlError naming `name`."""
    if not is_number(value):
        raise ControlError(f"{name} expects a finite number, got {show(value)}")
    return value


def show(v) -> str:
    """A value as an error message quotes it: its repr, cut to 60 characters."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
