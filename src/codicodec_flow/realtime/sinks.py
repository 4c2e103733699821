"""Where the audio goes: a sound card through PortAudio, a WAV file, or nowhere; and the --save recorder.

A sink consumes the ring (ring.py) from its own thread until the ring is closed and empty.
Clocked sinks take audio at the pace of a clock (the sound card's, or a timer for `wav`/`null`
paced in real time) and so can underrun; unclocked ones take it as fast as it comes, which is
what headless benchmarks and tests want. The timer of a paced file or null sink may run `speed`
times faster than real time: throttling and underruns behave the same, only sooner.

A clocked sink tells the ring, with each block it takes, when that block's first sample sounds: a timer sink
its deadline (an exact schedule, output latency 0), the sound card PortAudio's DAC time for the buffer
(outputBufferDacTime, else the stream's reported output latency). Alignment with a performer is measured,
and a lookahead engine schedules its chunks, on those figures.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from ..codec import CHANNELS, SAMPLE_RATE
from ..errors import FlowError
from ..util.fsutil import atomic_path
from .ring import AudioRing

log = logging.getLogger(__name__)

BLOCK = 2048  # samples a timer-clocked sink takes at a time (~43 ms)
SINKS = ("sounddevice", "wav", "null")
_WAV_MAX_FRAMES = (2**32 - 2**16) // (CHANNELS * 3)  # 24-bit stereo WAV stops at 4 GiB (~4.1 h)


class AudioDeviceError(FlowError):
    """No usable sound card (PortAudio missing, no device, or the device refused the format)."""


def import_sounddevice(direction: str = "output"):
    """The sounddevice module, or AudioDeviceError saying what to do when PortAudio is missing."""
    alternative = ("use --sink wav --out FILE or --sink null" if direction == "output"
                   else "use --input-wav FILE to replay a recording as the live input")
    try:
        import sounddevice
    except (OSError, ImportError) as exc:  # sounddevice raises OSError when the PortAudio library is absent
        raise AudioDeviceError(f"no audio {direction}: PortAudio not found ({str(exc).strip() or type(exc).__name__}); "
                               f"install it (Debian/Ubuntu: apt install libportaudio2; macOS: brew install "
                               f"portaudio) or {alternative}") from None
    return sounddevice


class WavWriter:
    """Writes a 48 kHz stereo 24-bit WAV incrementally into a temporary file, renamed into place on close.

    A session of hours is never held in memory, and a crash leaves no truncated file at `path`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.suffix.lower() != ".wav":
            raise FlowError(f"{self.path}: audio is written as WAV; give a path ending in .wav")
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._fh = sf.SoundFile(str(tmp), "w", SAMPLE_RATE, CHANNELS, "PCM_24", format="WAV")
        self.frames = 0
        self.full = False
        self._lock = threading.Lock()

    def write(self, wave: np.ndarray) -> None:
        """Append (2, n) float32 audio."""
        with self._lock:
            if self._fh.closed or self.full:
                return
            room = _WAV_MAX_FRAMES - self.frames
            if wave.shape[1] > room:
                self.full = True  # the session goes on; the file ends where WAV ends
                log.warning(f"{self.path} reached the 4 GiB WAV limit; recording stopped there")
            block = np.clip(wave[:, :room], -1.0, 1.0)
            self._fh.write(np.ascontiguousarray(block.T))
            self.frames += block.shape[1]

    def close(self) -> Path:
        """Finish the file and move it into place; safe to call twice."""
        with self._lock:
            if not self._fh.closed:
                self._fh.close()
                self._stack.close()
        return self.path

    def abort(self) -> None:
        """Drop the temporary file (the session never started): no empty WAV is left at `path`."""
        with self._lock:
            if not self._fh.closed:
                self._fh.close()
                self._stack.__exit__(FlowError, FlowError("aborted"), None)  # atomic_path removes the temporary


class TimedSink:
    """Base of the file and null sinks: take BLOCK samples per clock tick, or as fast as they come."""

    output_latency = 0.0  # its clock is the schedule itself

    def __init__(self, paced: bool, speed: float = 1.0):
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}")
        self.clocked, self.speed = paced, speed

    def write(self, block: np.ndarray) -> None:
        """Consume (2, n) audio."""

    def run(self, ring: AudioRing, stop: threading.Event) -> None:
        """Consume until the ring is closed and drained (or stop is set)."""
        t0, n = time.perf_counter(), 0
        while not stop.is_set():
            due = None
            if self.clocked:
                # deadlines from the start, not sleeps per block: a late wake-up is caught up, never accumulated
                due = t0 + n * BLOCK / (SAMPLE_RATE * self.speed)
                wait = due - time.perf_counter()
                if wait > 0 and stop.wait(wait):
                    break
            block = ring.read(BLOCK, wait=not self.clocked, sounds_at=due)
            if block is None:
                break
            self.write(block)
            n += 1

    def close(self) -> None:
        """Release what the sink holds."""


class NullSink(TimedSink):
    """Discards the audio: headless benchmarks (unpaced) and real-time tests without a sound card (paced)."""

    name = "null"

    def __init__(self, paced: bool = False, speed: float = 1.0):
        super().__init__(paced, speed)
        self.frames = 0

    def write(self, block: np.ndarray) -> None:
        self.frames += block.shape[1]


class WavSink(TimedSink):
    """Writes what a sound card would have played (underruns included, as silence) to a WAV file."""

    name = "wav"

    def __init__(self, path: str | Path, paced: bool = True, speed: float = 1.0):
        super().__init__(paced, speed)
        self.writer = WavWriter(path)

    def write(self, block: np.ndarray) -> None:
        self.writer.write(block)

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.abort()


class SoundDeviceSink:
    """The system's default (or a named) output through PortAudio; the card's clock paces the stream."""

    name = "sounddevice"
    clocked = True

    def __init__(self, device: str | int | None = None):
        self._sd = import_sounddevice("output")
        try:
            info = self._sd.query_devices(device, kind="output")
        except Exception as exc:  # PortAudioError, or ValueError for an unknown name
            raise AudioDeviceError(f"no audio output device{f' {device!r}' if device is not None else ''} "
                                   f"({str(exc).strip()}); use --sink wav --out FILE or --sink null") from None
        self.device_name = str(info.get("name", device))
        self.device = device
        self.output_latency: float | None = None  # seconds from a callback to its first sample at the DAC, as reported

    def run(self, ring: AudioRing, stop: threading.Event) -> None:
        sd, done = self._sd, threading.Event()

        def callback(outdata, frames, time_info, _status):  # PortAudio's thread: no allocation-heavy work here
            self.output_latency = _playback_latency(time_info, stream)
            block = ring.read(frames, wait=False, sounds_at=time.perf_counter() + self.output_latency)
            if block is None:
                outdata.fill(0)
                raise sd.CallbackStop
            outdata[:block.shape[1]] = block.T
            outdata[block.shape[1]:] = 0
            if block.shape[1] < frames:  # the ring closed mid-block: this was the end
                raise sd.CallbackStop

        try:
            stream = sd.OutputStream(samplerate=SAMPLE_RATE, channels=CHANNELS, dtype="float32", device=self.device,
                                     callback=callback, finished_callback=done.set)
        except Exception as exc:
            raise AudioDeviceError(f"the output {self.device_name!r} refused 48 kHz stereo float32 "
                                   f"({str(exc).strip()}); pick another with --output-device, or use "
                                   f"--sink wav/null") from None
        with stream:
            while not done.wait(0.05) and not stop.is_set():
                pass

    def close(self) -> None:
        """Nothing to release: the stream closes when run returns."""


def _playback_latency(time_info, stream) -> float:
    """Seconds from this callback to its buffer's first sample at the DAC: PortAudio's timestamps where the host
    reports them (outputBufferDacTime - currentTime), else the stream's reported output latency."""
    dac, now = getattr(time_info, "outputBufferDacTime", 0.0), getattr(time_info, "currentTime", 0.0)
    if dac > 0 and 0.0 <= dac - now < 1.0:
        return float(dac - now)
    latency = getattr(stream, "latency", 0.0)
    return float(latency) if isinstance(latency, (int, float)) else 0.0


def open_sink(kind: str, out: str | Path | None = None, paced: bool = True, device: str | int | None = None,
              speed: float = 1.0):
    """Build the sink --sink asks for; errors say which flag is missing or what to use instead."""
    if kind == "null":
        return NullSink(paced, speed)
    if kind == "wav":
        if out is None:
            raise FlowError("--sink wav needs --out FILE.wav (where the played audio goes)")
        return WavSink(out, paced, speed)
    if kind == "sounddevice":
        return SoundDeviceSink(device)
    raise FlowError(f"unknown --sink {kind!r}: choose one of {', '.join(SINKS)}")
