"""A small procedural band (drums, bass, chords, a lead line) that writes example music offline.

Used by `demo` so the whole pipeline runs on a fresh machine without any audio of your own.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..codec.audio import write_wav
from ..codec.base import SAMPLE_RATE

_MINOR = [0, 2, 3, 5, 7, 8, 10]
_PROGRESSIONS = [[0, 5, 3, 4], [0, 3, 4, 4], [0, 6, 5, 4], [0, 4, 5, 3]]


def _tone(freq: float, n: int, sr: int, bright: float) -> np.ndarray:
    t = np.arange(n) / sr
    wave = sum((bright ** (k - 1)) / k * np.sin(2 * math.pi * freq * k * t) for k in range(1, 6))
    return wave * np.exp(-3.0 * t)


def _drum(kind: str, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / sr
    if kind == "kick":
        return np.sin(2 * math.pi * (50 + 90 * np.exp(-30 * t)) * t) * np.exp(-9 * t)
    noise = rng.standard_normal(n)
    if kind == "snare":
        return (0.6 * noise + 0.4 * np.sin(2 * math.pi * 190 * t)) * np.exp(-18 * t)
    return np.diff(noise, prepend=0.0) * np.exp(-60 * t) * 0.5  # hat: bright, short


def song(seconds: float, seed: int, sr: int = SAMPLE_RATE) -> np.ndarray:
    """(2, N) float32 stereo: a loop-based groove with a chord progression, in a key and tempo set by seed."""
    rng = np.random.default_rng(seed)
    bpm = float(rng.choice([92, 100, 108, 116, 124]))
    root = 45 + int(rng.integers(0, 12))  # MIDI note of the key's root (A2 .. G#3)
    prog = _PROGRESSIONS[seed % len(_PROGRESSIONS)]
    beat = 60.0 / bpm
    n = int(seconds * sr)
    left, right = np.zeros(n), np.zeros(n)

    def add(sig: np.ndarray, start_s: float, gain: float, pan: float) -> None:
        i = int(start_s * sr)
        if i >= n:
            return
        sig = sig[: n - i] * gain
        left[i:i + len(sig)] += sig * (1 - pan)
        right[i:i + len(sig)] += sig * (1 + pan)

    midi = lambda m: 440.0 * 2 ** ((m - 69) / 12)  # noqa: E731
    for b in range(int(seconds / beat) + 1):
        start, bar, pos = b * beat, b // 4, b % 4
        degree = prog[bar % len(prog)]
        chord_root = root + _MINOR[degree % 7]
        add(_drum("kick", int(0.4 * sr), sr, rng), start, 0.7 if pos in (0, 2) else 0.0, 0.0)
        add(_drum("snare", int(0.3 * sr), sr, rng), start, 0.35 if pos in (1, 3) else 0.0, 0.1)
        for half in (0.0, 0.5):
            add(_drum("hat", int(0.1 * sr), sr, rng), start + half * beat, 0.25, -0.4)
        add(_tone(midi(chord_root - 12), int(beat * sr), sr, 0.3), start, 0.35, 0.0)  # bass on every beat
        if pos == 0:  # a chord per bar
            for k, interval in enumerate((0, 3 + (degree in (2, 4, 5)), 7)):
                add(_tone(midi(chord_root + 12 + interval), int(4 * beat * sr), sr, 0.5) * 0.6, start, 0.12,
                    (k - 1) * 0.5)
        if rng.random() < 0.6:  # a lead note from the scale
            note = root + 24 + _MINOR[int(rng.integers(0, 7))]
            add(_tone(midi(note), int(beat * sr), sr, 0.7), start + beat * float(rng.choice([0, 0.5])), 0.18, 0.3)
    out = np.stack([left, right])
    return (0.8 * out / max(1e-6, np.abs(out).max())).astype(np.float32)


def write_songs(folder: str | Path, count: int, seconds: float) -> list[Path]:
    """Write `count` example songs of `seconds` each as WAV files."""
    import torch
    folder = Path(folder)
    return [write_wav(folder / f"groove_{i:02d}.wav", torch.from_numpy(song(seconds, seed=i))) for i in range(count)]
