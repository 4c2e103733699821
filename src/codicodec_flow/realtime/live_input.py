"""Live input for accompaniment: whole codec chunks (2, 32768) of 48 kHz stereo audio, as a performer plays them.

`WavInput` replays a file as if it were live (paced: chunk k is handed over when its last sample
would have been played, (k + 1) * 0.683 s after the start), so the whole accompaniment path runs
headless; unpaced it goes as fast as the engine takes it. `DeviceInput` records from a sound card
through PortAudio at the card's rate and resamples to 48 kHz like audio.py does. Each chunk carries
the moment it was complete, from which the engine measures its latency, and the moment the performer played
its first sample (`started_at`), the grid a lookahead engine lines its output up with: exact for a paced file
(its schedule), and for a sound card the capture time PortAudio reports for the block (inputBufferAdcTime, else
the stream's reported input latency), so the card's input latency is taken out.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr
import torch

from ..codec.audio import audio_info, iter_audio_blocks, to_stereo
from ..codec import CHANNELS, CHUNK_SAMPLES, CHUNK_SECONDS, SAMPLE_RATE
from ..errors import AudioError
from .clock import REAL_CLOCK
from .sinks import AudioDeviceError, import_sounddevice

LISTEN_MODES = ("input", "mix")


@dataclass(frozen=True)
class InputChunk:
    index: int  # 0, 1, ... in the performer's time (a chunk dropped because the engine lagged leaves a gap)
    audio: torch.Tensor  # (2, 32768) float32 at 48 kHz
    complete_at: float  # when its last sample arrived, on the input's clock (time.perf_counter(); clock.py)
    started_at: float | None = None  # when its first sample was played, on the same clock (None: no clock)


class _Chunker:
    """Cuts a stream of (2, n) blocks into (2, 32768) chunks without copying more than once."""

    def __init__(self):
        self._parts: list[np.ndarray] = []
        self._held = 0

    def push(self, block: np.ndarray) -> list[np.ndarray]:
        self._parts.append(block)
        self._held += block.shape[1]
        out = []
        while self._held >= CHUNK_SAMPLES:
            joined = np.concatenate(self._parts, axis=1)  # (2, held)
            out.append(joined[:, :CHUNK_SAMPLES])
            rest = joined[:, CHUNK_SAMPLES:]
            self._parts, self._held = ([rest] if rest.shape[1] else []), rest.shape[1]
        return out


class WavInput:
    """A file replayed as a live performer: whole chunks, paced at real time (or unpaced); the tail is dropped."""

    def __init__(self, path: str | Path, paced: bool = True, speed: float = 1.0, clock=REAL_CLOCK):
        """clock: what the performer's time is read and waited on (clock.py; a simulation's in tests)."""
        self.path, self.paced, self.speed, self.clock = Path(path), paced, speed, clock
        audio_info(self.path)  # a missing or unreadable file fails here, before the stream starts
        self._blocks = iter_audio_blocks(self.path)
        self._chunker, self._ready = _Chunker(), []
        self._index, self._t0 = 0, None

    def read(self, stop: threading.Event) -> InputChunk | None:
        """The next chunk once it is complete, or None at the end of the file (or when stop is set)."""
        if self._t0 is None:
            self._t0 = self.clock.now()  # the performer starts when the engine first listens
        while not self._ready:
            block = next(self._blocks, None)
            if block is None:
                if self._index == 0:
                    raise AudioError(f"{self.path}: shorter than one codec chunk ({CHUNK_SECONDS:.3f} s); "
                                     f"a live input needs at least one")
                return None
            self._ready = self._chunker.push(block)
        started = None
        if self.paced:
            started = self._t0 + self._index * self.period
            if self.clock.sleep_until(started + self.period, stop):
                return None
        elif stop.is_set():
            return None
        audio = torch.from_numpy(np.ascontiguousarray(self._ready.pop(0)))
        chunk = InputChunk(self._index, audio, self.clock.now(), started)
        self._index += 1
        return chunk

    @property
    def period(self) -> float:
        """Seconds between chunks on this input's clock."""
        return CHUNK_SECONDS / self.speed

    input_latency = 0.0  # a file has no capture path: its schedule is exact

    def close(self) -> None:
        self._blocks.close()


class DeviceInput:
    """A sound card's input through PortAudio, cut into chunks; if the engine falls behind, the oldest
    waiting chunks are dropped (counted in `dropped`) so the model always answers the latest playing."""

    MAX_WAITING = 2  # chunks held for the engine before the oldest is dropped

    def __init__(self, device: str | int | None = None):
        sd = import_sounddevice("input")
        try:
            info = sd.query_devices(device, kind="input")
        except Exception as exc:
            raise AudioDeviceError(f"no audio input device{f' {device!r}' if device is not None else ''} "
                                   f"({str(exc).strip()}); use --input-wav FILE instead") from None
        self.name = str(info.get("name", device))
        self.rate = int(info.get("default_samplerate") or SAMPLE_RATE)
        self.channels = max(1, min(int(info.get("max_input_channels") or 1), 2))
        self._resampler = (None if self.rate == SAMPLE_RATE else
                           soxr.ResampleStream(self.rate, SAMPLE_RATE, CHANNELS, dtype="float32", quality="HQ"))
        self._chunker, self._queue = _Chunker(), queue.Queue()
        self._index, self.dropped = 0, 0
        self._frames = 0  # input frames received before the current block
        self.input_latency: float | None = None  # seconds from the performer's sound to the callback, as reported
        try:
            self._stream = sd.InputStream(samplerate=self.rate, channels=self.channels, dtype="float32", device=device,
                                          callback=self._callback)
            self._stream.start()
        except Exception as exc:
            raise AudioDeviceError(f"the input {self.name!r} could not be opened ({str(exc).strip()}); "
                                   f"pick another with --input-device, or use --input-wav FILE") from None

    def _callback(self, indata, frames, time_info, _status) -> None:
        now = time.perf_counter()
        self.input_latency = _capture_latency(time_info, getattr(self, "_stream", None))
        first = now - self.input_latency  # when this block's first frame was played into the card
        stereo = to_stereo(np.asarray(indata, dtype=np.float32))  # (n, 2)
        if self._resampler is not None:
            stereo = self._resampler.resample_chunk(stereo)
        for chunk in self._chunker.push(np.ascontiguousarray(stereo.T)):
            start_frame = self._index * CHUNK_SAMPLES * self.rate / SAMPLE_RATE  # its first sample, at the card's rate
            self._queue.put((chunk, now, first + (start_frame - self._frames) / self.rate, self._index))
            self._index += 1
            while self._queue.qsize() > self.MAX_WAITING:
                try:
                    self._queue.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    break
        self._frames += frames

    def read(self, stop: threading.Event) -> InputChunk | None:
        """The next complete chunk; None when stop is set."""
        while not stop.is_set():
            try:
                chunk, at, started, index = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            return InputChunk(index, torch.from_numpy(np.ascontiguousarray(chunk)), at, started)
        return None

    period = CHUNK_SECONDS  # a sound card's clock is the real one

    def close(self) -> None:
        self._stream.stop()
        self._stream.close()


def _capture_latency(time_info, stream) -> float:
    """Seconds from the sound reaching the card to this callback: PortAudio's timestamps for the block where the
    host reports them (currentTime - inputBufferAdcTime), else the stream's reported input latency."""
    adc, now = getattr(time_info, "inputBufferAdcTime", 0.0), getattr(time_info, "currentTime", 0.0)
    if adc > 0 and 0.0 <= now - adc < 1.0:
        return float(now - adc)
    latency = getattr(stream, "latency", 0.0)
    return float(latency) if isinstance(latency, (int, float)) else 0.0
