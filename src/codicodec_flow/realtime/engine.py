"""The real-time engine: one thread generates and decodes chunk after chunk into a bounded ring; another plays it.

Generation thread (the only one that touches the model and the codec), per chunk:
  1. take the controls submitted since the last chunk (commands only ever land between chunks);
  2. without an input, wait while the ring already holds `prebuffer` chunks (throttle: running
     faster than real time keeps the buffer, and so the delay before a control is heard, short);
     with an input, wait for the performer's next chunk instead, encode it and add it (or the
     mix of it and the model's chunk that played meanwhile) to the context;
  3. generate, steer, decode with the codec's streaming decode_next, push to the ring and --save;
  4. emit a "chunk" event: compute time, real-time factor, buffer level, underruns, latency.
Playback thread: waits until `prebuffer` chunks are queued, then runs the sink until the ring drains.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from ..codec import CHUNK_SAMPLES, CHUNK_SECONDS, SAMPLE_RATE, Codec
from .generator import LiveGenerator
from .live_input import LISTEN_MODES
from .ring import AudioRing
from .state import ControlError, Controls, Limits, Update, apply_message

Listener = Callable[[dict], None]
STATS_WINDOW = 8192  # chunks (~93 min) kept for percentiles


@dataclass(frozen=True)
class EngineConfig:
    prebuffer: int = 2  # chunks queued before playback starts; also the level the throttle holds
    crossfade_chunks: int = 4  # length of a seed crossfade
    max_chunks: int | None = None  # stop after this many chunks (None: until quit, or the input ends)
    listen: str = "input"  # with an input: "input" (the performer is the context) or "mix" (performer + model)
    headroom: int = 4  # ring capacity beyond the prebuffer, in chunks (absorbs an unpaced input)

    def __post_init__(self):
        if self.prebuffer < 1:
            raise ValueError(f"--prebuffer must be at least 1 chunk, got {self.prebuffer}")
        if self.crossfade_chunks < 1:
            raise ValueError(f"--crossfade-chunks must be at least 1, got {self.crossfade_chunks}")
        if self.max_chunks is not None and self.max_chunks < 1:
            raise ValueError(f"--max-chunks must be at least 1, got {self.max_chunks}")
        if self.listen not in LISTEN_MODES:
            raise ValueError(f"--listen must be one of {', '.join(LISTEN_MODES)}, got {self.listen!r}")


@dataclass(frozen=True)
class ChunkStats:
    index: int
    compute_s: float  # encode (with an input) + generate + decode
    rtf: float  # chunk seconds / compute seconds: above 1 is faster than real time
    buffer_s: float  # audio queued right after this chunk was pushed
    underruns: int  # so far, whole session
    latency_s: float | None = None  # input chunk complete -> this chunk decoded and in the ring
    play_delay_s: float | None = None  # ... plus the audio queued ahead of it: when it starts to sound


@dataclass
class Summary:
    chunks: int = 0
    audio_s: float = 0.0
    wall_s: float = 0.0  # start to end of the generation loop, waits included
    compute_mean_s: float = 0.0
    compute_p95_s: float = 0.0
    rtf: float = 0.0  # sustained: audio seconds / compute seconds over the whole session
    wall_rtf: float = 0.0  # audio seconds / wall seconds (equals rtf's meaning only when unthrottled)
    underruns: int = 0
    peak_buffer_s: float = 0.0
    latency_mean_s: float | None = None
    latency_p95_s: float | None = None
    play_delay_mean_s: float | None = None
    per_chunk: list[ChunkStats] = field(default_factory=list, repr=False)  # the last STATS_WINDOW chunks

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "per_chunk"}


class Engine:
    """Runs a LiveGenerator against a sink in real time; see the module docstring."""

    def __init__(self, gen: LiveGenerator, codec: Codec, sink, cfg: EngineConfig, controls: Controls,
                 recorder=None, source=None, warmup: torch.Tensor | None = None):
        self.gen, self.codec, self.sink, self.cfg = gen, codec, sink, cfg
        self.recorder, self.source, self.warmup = recorder, source, warmup  # warmup: (8, 64) raw latents
        self.limits = Limits(window=gen.model.cfg.context_chunks, initial=controls)
        self.ring = AudioRing((cfg.prebuffer + cfg.headroom) * CHUNK_SAMPLES)
        self._lock = threading.Lock()
        self._pending, self._seed_mode = controls, "crossfade"
        self._listeners: list[Listener] = []
        self.midi_learn: Callable[[str], None] | None = None  # set by midi.MidiControl: arms its learn mode
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_wave: torch.Tensor | None = None  # (2, 32768) the model's latest chunk, for --listen mix
        self.stats: deque[ChunkStats] = deque(maxlen=STATS_WINDOW)  # bounded: sessions may run for hours
        self.chunks = 0  # chunks generated, all session
        self._compute_total = 0.0  # their compute seconds
        self.error: BaseException | None = None
        self._t0 = self._t1 = 0.0

    # ------------------------------------------------------------------ control side (any thread)

    def subscribe(self, listener: Listener) -> None:
        """listener(event) is called from the generation thread for every event; keep it quick."""
        self._listeners.append(listener)

    def submit(self, msg: object) -> Update:
        """Validate and queue a control message for the next chunk; ControlError leaves everything unchanged."""
        with self._lock:
            upd = apply_message(self._pending, msg, self.limits)
            if upd.midi_learn is not None:  # armed (and its target checked) only when the whole message is good
                if self.midi_learn is None:
                    raise ControlError("midi_learn needs a MIDI input: start realtime with --midi PORT")
                self.midi_learn(upd.midi_learn)
            self._pending = upd.controls
            if upd.seed_mode is not None:
                self._seed_mode = upd.seed_mode
        if upd.quit:
            self.stop()
        return upd

    @property
    def pending(self) -> Controls:
        """The controls the next chunk will use."""
        with self._lock:
            return self._pending

    def state(self) -> dict:
        """What a front end shows: the next chunk's controls, the seed crossfade, counters."""
        xf = self.gen.noise.crossfade
        return {**self.pending.to_json(), "crossfade": list(xf) if xf else None, "next_chunk": self.chunks,
                "underruns": self.ring.underruns}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "Engine":
        self._t0 = time.perf_counter()
        self._threads = [threading.Thread(target=self._guard(self._generate), name="realtime-generate", daemon=True),
                         threading.Thread(target=self._guard(self._play), name="realtime-play", daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Stop now: generation ends after the current chunk and what is queued is not played."""
        self._stop.set()
        self.ring.close(discard=True)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the end (max chunks, the input's end, or stop); re-raise a thread's error. True if ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self.error is not None:
            raise self.error
        return not any(t.is_alive() for t in self._threads)

    def run(self) -> Summary:
        """Generate in the calling thread while a background thread plays; summarise at the end (Ctrl-C stops cleanly).

        The model runs on the caller's thread because CPU math libraries keep their worker pool with
        the thread that first used them: the same chunk measured 1.7x slower from a fresh thread on a
        2-core machine once the main thread had run any matrix product. start() runs both in threads.
        """
        self._t0 = time.perf_counter()
        self._threads = [threading.Thread(target=self._guard(self._play), name="realtime-play", daemon=True)]
        self._threads[0].start()
        try:
            self._generate()  # its errors (and Ctrl-C) reach the caller directly; finally stops the player
            while not self.wait(0.2):
                pass
        finally:
            self.stop()
        return self.summary()

    def summary(self) -> Summary:
        s = list(self.stats)  # percentiles and latency over the last STATS_WINDOW chunks; rtf over all
        compute = np.array([c.compute_s for c in s]) if s else np.zeros(1)
        lat = [c.latency_s for c in s if c.latency_s is not None]
        delay = [c.play_delay_s for c in s if c.play_delay_s is not None]
        audio = self.chunks * CHUNK_SECONDS
        wall = max((self._t1 or time.perf_counter()) - self._t0, 1e-9)
        return Summary(chunks=self.chunks, audio_s=audio, wall_s=wall,
                       compute_mean_s=self._compute_total / max(self.chunks, 1),
                       compute_p95_s=float(np.percentile(compute, 95)), rtf=audio / max(self._compute_total, 1e-9),
                       wall_rtf=audio / wall, underruns=self.ring.underruns,
                       peak_buffer_s=self.ring.peak / SAMPLE_RATE,
                       latency_mean_s=float(np.mean(lat)) if lat else None,
                       latency_p95_s=float(np.percentile(lat, 95)) if lat else None,
                       play_delay_mean_s=float(np.mean(delay)) if delay else None, per_chunk=s)

    # ------------------------------------------------------------------ threads

    def _guard(self, fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # handed to wait(), which re-raises it in the caller's thread
                self.error = self.error or exc
                self.stop()
        return run

    def _generate(self) -> None:
        try:
            self.codec.reset()
            if self.warmup is not None:  # the prompt's last chunk: the decoder's past runs into the stream
                self.codec.decode_next(self.warmup)
            while not self._stop.is_set() and (self.cfg.max_chunks is None or self.chunks < self.cfg.max_chunks):
                if not self._one_chunk():
                    break
            self._emit({"event": "end", **self.summary().to_json()})
        finally:
            self._t1 = time.perf_counter()
            self.ring.close(discard=self._stop.is_set())

    def _one_chunk(self) -> bool:
        heard = None
        if self.source is not None:
            heard = self.source.read(self._stop)  # blocks until the performer's chunk is complete
            if heard is None:
                return False
        elif not self.ring.wait_until(lambda level: level < self.cfg.prebuffer * CHUNK_SAMPLES, self._stop):
            return False  # stopped while throttled
        with self._lock:  # after the wait, so a control sent meanwhile is heard in this very chunk
            controls, mode = self._pending, self._seed_mode
        if controls != self.gen.controls:
            self.gen.configure(controls, mode, self.cfg.crossfade_chunks)
        xf = self.gen.noise.crossfade  # the blend this chunk is drawn with
        t0 = time.perf_counter()
        if heard is not None:
            audio = heard.audio
            if self.cfg.listen == "mix" and self._last_wave is not None:
                audio = audio + self._last_wave  # the band as it sounded in that moment
            self.gen.add_context_latents(self.codec.encode(audio)[0])  # (8, 64)
            z = self.gen.next_chunk(as_context=False)  # (1, 8, 64): the performer's audio is the context, not the guess
        else:
            z = self.gen.next_chunk()
        # clipped once here so the card, the file sinks and --save all get the same, never-wrapping audio
        wave = self.codec.decode_next(z[0]).float().cpu().clamp(-1.0, 1.0)  # (2, 32768)
        compute = time.perf_counter() - t0
        ahead = self.ring.level
        if not self.ring.write(wave.numpy(), self._stop):
            return False
        done = time.perf_counter()
        if self.recorder is not None:
            self.recorder.write(wave.numpy())
        self._last_wave = wave
        latency = None if heard is None else done - heard.complete_at
        stats = ChunkStats(index=self.chunks, compute_s=compute, rtf=CHUNK_SECONDS / max(compute, 1e-9),
                           buffer_s=self.ring.level / SAMPLE_RATE, underruns=self.ring.underruns, latency_s=latency,
                           play_delay_s=None if latency is None else latency + ahead / SAMPLE_RATE)
        self.stats.append(stats)
        self.chunks += 1
        self._compute_total += compute
        self._emit({"event": "chunk", **asdict(stats), "input_index": None if heard is None else heard.index,
                    "state": {**controls.to_json(), "crossfade": list(xf) if xf else None}})
        return True

    def _play(self) -> None:
        self.ring.wait_until(lambda level: level >= self.cfg.prebuffer * CHUNK_SAMPLES, self._stop)
        if not self._stop.is_set():
            self.sink.run(self.ring, self._stop)

    def _emit(self, event: dict) -> None:
        for listener in list(self._listeners):
            listener(event)
