"""The real-time engine: one thread generates and decodes chunk after chunk into a bounded ring; another plays it.

Generation thread (the only one that touches the model and the codec), per chunk:
  1. without an input, wait while the ring already holds `prebuffer` chunks (throttle: running
     faster than real time keeps the buffer, and so the delay before a control is heard, short);
     with an input, wait for the performer's next chunk instead;
  2. take the controls submitted since the last chunk (commands only ever land between chunks),
     auto-cycle the seed when due, and modulate them for this chunk (LFOs, a morph: state.modulate);
  3. with an input, encode it and add it (or the mix of it and the model's chunk that played
     meanwhile) to the context; generate, steer, decode with the codec's streaming decode_next;
  4. recovery: a draft with NaN/inf latents or audio, or one that raised, is drawn again with fresh
     noise (`retries` times); if every try fails the chunk is silence (faded from the last sample),
     a "recovered" event says so and the stream goes on; `max_failed_chunks` given-up chunks in a
     row end the session with an error instead of playing silence for ever;
  5. apply the gain (ramped across the chunk, limited so a boost never pushes a chunk past full
     scale), clip, push to the ring and --save;
  6. emit a "chunk" event (compute time, real-time factor, buffer level, underruns, latency, the
     controls and their modulated values), and the opt-in "waveform" and "latents" events.
Playback thread: waits until `prebuffer` chunks are queued, then runs the sink until the ring drains.
Before the first chunk a "ready" event gives the model's facts (sizes, window, codec, sample rate).

With --lookahead N (lookahead.py) step 3 puts the performer's chunk k in place of the model's guess for it
and the chunk made is the one for slot k + N; step 5 places it on a timeline (timeline.py) where it starts
when the performer starts input chunk k + N, instead of queueing it, and the sink runs from the start.
Alignment: each chunk written for an input chunk j records when its first sample sounded (the sink says),
and (that moment) - (when the performer started input chunk j) is its alignment error, in a "played" event
and the summary. A lookahead chunk that misses its slot is cut to the grid ("late" event), never played late.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np
import torch

from ..codec import CHANNELS, CHUNK_SAMPLES, CHUNK_SECONDS, LATENT_DIM, SAMPLE_RATE, TOKENS_PER_CHUNK, Codec
from ..errors import FlowError
from .clock import REAL_CLOCK
from .generator import LiveGenerator
from .live_input import LISTEN_MODES, InputChunk
from .lookahead import MAX_LOOKAHEAD, Lookahead
from .modulation import derived_seed
from .ring import AudioRing
from .stats import ChunkStats, Summary, summarise
from .timeline import Timeline
from .state import MAX_GAIN, ControlError, Controls, Limits, Update, apply_message, describe, modulate

log = logging.getLogger(__name__)

Listener = Callable[[dict], None]
STATS_WINDOW = 8192  # chunks (~93 min) kept for percentiles
WAVEFORM_POINTS = 128  # min/max pairs per chunk in a "waveform" event (256 samples each)
FADE = 480  # samples (10 ms) of the ramps into and out of a recovered chunk's silence
LIMIT = 0.98  # the peak a gain above 1 may raise a chunk to (about -0.2 dBFS)


class RealtimeError(FlowError):
    """The stream cannot go on (generation keeps failing)."""


@dataclass(frozen=True)
class EngineConfig:
    prebuffer: int = 2  # chunks queued before playback starts; also the level the throttle holds
    max_chunks: int | None = None  # stop after this many chunks (None: until quit, or the input ends)
    listen: str = "input"  # with an input: "input" (the performer is the context) or "mix" (performer + model)
    headroom: int = 4  # ring capacity beyond the prebuffer, in chunks (absorbs an unpaced input)
    retries: int = 2  # fresh-noise redraws of a chunk that came out NaN/inf (or raised) before it is given up
    max_failed_chunks: int = 8  # given-up chunks in a row that end the session
    lookahead: int = 0  # with an input: make the chunk for input chunk k + N and play it on the grid (0: off)

    def __post_init__(self):
        if self.prebuffer < 1:
            raise ValueError(f"--prebuffer must be at least 1 chunk, got {self.prebuffer}")
        if self.retries < 0 or self.max_failed_chunks < 1:
            raise ValueError(f"retries must be >= 0 and max_failed_chunks >= 1, got {self.retries}, "
                             f"{self.max_failed_chunks}")
        if self.max_chunks is not None and self.max_chunks < 1:
            raise ValueError(f"--max-chunks must be at least 1, got {self.max_chunks}")
        if self.listen not in LISTEN_MODES:
            raise ValueError(f"--listen must be one of {', '.join(LISTEN_MODES)}, got {self.listen!r}")
        if not 0 <= self.lookahead <= MAX_LOOKAHEAD:
            raise ValueError(f"--lookahead must be 0..{MAX_LOOKAHEAD} chunks, got {self.lookahead}")


class Engine:
    """Runs a LiveGenerator against a sink in real time; see the module docstring."""

    def __init__(self, gen: LiveGenerator, codec: Codec, sink, cfg: EngineConfig, controls: Controls,
                 recorder=None, source=None, warmup: torch.Tensor | None = None, presets=None,
                 info: dict | None = None):
        """presets: a presets.PresetStore (None: presets off); info: facts for the "ready" event (checkpoint...)."""
        self.gen, self.codec, self.sink, self.cfg = gen, codec, sink, cfg
        self.recorder, self.source, self.warmup = recorder, source, warmup  # warmup: (8, 64) raw latents
        self.limits = Limits(window=gen.model.cfg.context_chunks, initial=controls, presets=presets)
        self.info = {"event": "ready", "sample_rate": SAMPLE_RATE, "channels": CHANNELS,
                     "chunk_samples": CHUNK_SAMPLES, "chunk_seconds": CHUNK_SECONDS,
                     "tokens_per_chunk": TOKENS_PER_CHUNK, "latent_dim": LATENT_DIM,
                     "window": gen.model.cfg.context_chunks, "codec": codec.name, "max_gain": MAX_GAIN,
                     "model": asdict(gen.model.cfg), "prebuffer": cfg.prebuffer, "lookahead": cfg.lookahead,
                     **(info or {})}
        rate = SAMPLE_RATE * getattr(sink, "speed", 1.0)  # samples per second of the sink's clock
        self.look: Lookahead | None = None
        if cfg.lookahead:
            if source is None:
                raise FlowError("--lookahead needs a live input (--input-wav or --input-device)")
            gen.reserve_rewind(cfg.lookahead)
            self.look = Lookahead(cfg.lookahead, getattr(source, "period", CHUNK_SECONDS))
            self.ring = Timeline((cfg.lookahead + 1 + cfg.headroom) * CHUNK_SAMPLES, rate)
        else:
            self.ring = AudioRing((cfg.prebuffer + cfg.headroom) * CHUNK_SAMPLES, rate)
        self.now = getattr(source, "clock", REAL_CLOCK).now  # the clock the input's and the sink's moments are on
        self.ring.now = self.now
        self._targets: dict[int, tuple[int, float]] = {}  # chunk -> (slot, when input chunk `slot` started)
        self._stats_lock = threading.Lock()
        self._player: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending, self._seed_mode = controls, "crossfade"
        self._next = 0  # the chunk the controls submitted now are first heard in (a morph starts there)
        self._gain: float | None = None  # the gain the last chunk ended with (the next one ramps from it)
        self._tail = np.zeros(CHANNELS, np.float32)  # the last sample played, where a silence fades from
        self._failed = 0  # chunks given up in a row
        self._silent = False  # the last chunk was a recovery's silence: fade the next one in
        self._sent: dict[str, float] = {}  # display event kind -> when it was last sent
        self.clock: Callable[[], float] = time.monotonic  # what the display events' rate limit reads
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
            upd = apply_message(self._pending, msg, self.limits, now=self._next)
            if upd.midi_learn is not None and self.midi_learn is None:
                raise ControlError("midi_learn needs a MIDI input: start realtime with --midi PORT")
            store = self.limits.presets
            try:  # before the new controls are taken: a preset that cannot be written changes nothing
                if upd.save is not None:
                    store.save(upd.save, upd.controls.preset_json())
                if upd.delete is not None:
                    store.delete(upd.delete)
            except FlowError as exc:
                raise ControlError(str(exc)) from None
            if upd.midi_learn is not None:  # armed (and its target checked) only when the whole message is good
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
        """What a front end shows: the controls as set, the values the next chunk gets from them ("effective":
        LFOs and a morph applied), the seed crossfade, the presets, counters."""
        with self._lock:
            c, k = self._pending, self._next
        xf = self.gen.noise.crossfade
        store = self.limits.presets
        return {**c.to_json(), "effective": modulate(c, k, self.limits.window).modulated_json(),
                "crossfade": list(xf) if xf else None, "next_chunk": k, "underruns": self.ring.underruns,
                "presets": store.names() if store is not None else None}

    def describe(self) -> dict:
        """Every control and command with its range and start value (state.describe), for {"help": true}."""
        return describe(self.limits)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "Engine":
        self._t0 = time.perf_counter()
        self._threads = [threading.Thread(target=self._guard(self._generate), name="realtime-generate", daemon=True),
                         threading.Thread(target=self._guard(self._play), name="realtime-play", daemon=True)]
        self._player = self._threads[1]
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
        self._player = self._threads[0]
        self._threads[0].start()
        try:
            self._generate()  # its errors (and Ctrl-C) reach the caller directly; finally stops the player
            while not self.wait(0.2):
                pass
        finally:
            self.stop()
        return self.summary()

    def summary(self) -> Summary:
        with self._stats_lock:
            per_chunk = list(self.stats)  # percentiles over the last STATS_WINDOW chunks; rtf over all
        audio = self.chunks * CHUNK_SECONDS
        wall = max((self._t1 or time.perf_counter()) - self._t0, 1e-9)
        period = self.look.period if self.look is not None else getattr(self.source, "period", CHUNK_SECONDS)
        return summarise(per_chunk, Summary(
            chunks=self.chunks, audio_s=audio, wall_s=wall, compute_mean_s=self._compute_total / max(self.chunks, 1),
            rtf=audio / max(self._compute_total, 1e-9), wall_rtf=audio / wall, underruns=self.ring.underruns,
            peak_buffer_s=self.ring.peak / SAMPLE_RATE, lookahead=self.cfg.lookahead,
            input_latency_s=getattr(self.source, "input_latency", None),
            output_latency_s=getattr(self.sink, "output_latency", None)),
            read_ahead_s=self.ring.read_ahead_s, period=period, chunk_s=CHUNK_SAMPLES / self.ring.rate)

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
            self._emit(dict(self.info))
            self.codec.reset()
            if self.warmup is not None:  # the prompt's last chunk: the decoder's past runs into the stream
                self.codec.decode_next(self.warmup)
            while not self._stop.is_set() and not self._enough():
                if not self._one_step():
                    break
            self._t1 = time.perf_counter()
            self.ring.close(discard=self._stop.is_set())
            self._play_out()
            self._emit({"event": "end", **self.summary().to_json()})
        finally:
            self._t1 = self._t1 or time.perf_counter()
            self.ring.close(discard=self._stop.is_set())

    def _enough(self) -> bool:
        return self.cfg.max_chunks is not None and self.chunks >= self.cfg.max_chunks

    def _play_out(self) -> None:
        """Wait while the player plays what is queued (the last chunks' alignment is measured as they sound)."""
        player = self._player
        if player is None or player is threading.current_thread():
            return
        deadline = time.monotonic() + self.ring.capacity / self.ring.rate + 5.0
        while player.is_alive() and not self._stop.is_set() and time.monotonic() < deadline:
            player.join(0.05)
            self._collect_sounded()
        self._collect_sounded()

    def _one_step(self) -> bool:
        """One input chunk (or, without an input, one chunk): listen, generate, queue. False: the end."""
        heard = None
        if self.source is not None:
            heard = self.source.read(self._stop)  # blocks until the performer's chunk is complete
            if heard is None:
                return False
        elif not self.ring.wait_until(lambda level: level < self.cfg.prebuffer * CHUNK_SAMPLES, self._stop):
            return False  # stopped while throttled
        if self.look is None:
            listen = None if heard is None else (lambda reasons: self._hear(self._heard(heard, self._last_wave),
                                                                             reasons))
            return self._one_chunk(heard, None if heard is None else heard.index, listen)
        slots, band = self.look.slots(heard), self.look.played_in(heard.index)  # before follow() lets that guess go
        listen = lambda reasons: self.look.follow(  # noqa: E731
            self.gen, heard, lambda: self._hear(self._heard(heard, band), reasons))
        for slot in slots:  # more than one at the start or after an input gap: a catch-up burst
            if not self._one_chunk(heard, slot, listen, catch_up=len(slots) > 1, whole=slot != slots[-1]):
                return False
            listen = None  # the context is ready for the chunks after the first
            if self._stop.is_set() or self._enough():
                break
        return True

    def _heard(self, heard: InputChunk, band: torch.Tensor | np.ndarray | None) -> torch.Tensor:
        """What the model hears of an input chunk: the performer, or with --listen mix the band as it sounded."""
        if self.cfg.listen == "mix" and band is not None:
            return heard.audio + torch.as_tensor(band)
        return heard.audio

    def _one_chunk(self, heard: InputChunk | None, slot: int | None, listen, catch_up: bool = False,
                   whole: bool = False) -> bool:
        """Generate, steer, decode, level and queue one chunk; listen(reasons), if given, first puts the input in
        the context. slot: the input chunk it lines up with (None: no input); with lookahead, whole: play it only
        if it can start on time (a guess made to catch up)."""
        index = self.chunks
        base, mode, cycled = self._take(index)  # after the wait, so a control sent meanwhile is heard in this chunk
        controls = modulate(base, index, self.limits.window)
        if controls != self.gen.controls:
            self.gen.configure(controls, mode, controls.crossfade_chunks)
        xf = self.gen.noise.crossfade  # the blend this chunk is drawn with
        t0 = time.perf_counter()
        reasons: list[str] = []
        if listen is not None:
            listen(reasons)
        heard_issues = len(reasons)
        # the model's own chunk is context without an input, and as the guess for its slot with lookahead
        wave, x0, ctx = self._render(heard is None or self.look is not None, reasons)
        failed = len(reasons) - heard_issues  # drafts that went wrong
        wave = self._level(wave, controls.gain)  # (2, 32768), within [-1, 1]
        compute = time.perf_counter() - t0
        audio = wave.numpy()
        late = placed = None
        if self.look is None:
            ahead = self.ring.level
            if not self.ring.write(audio, self._stop, mark=index if slot is not None else None):
                return False
        else:
            placed = self.ring.place(audio, self.look.target(slot), self._stop, mark=index, whole=whole)
            if placed is None:
                return False
            late = placed.cut / self.ring.rate
            if placed.cut:
                audio = audio.copy()
                audio[:, :placed.cut] = 0.0  # what sounded in that slot
            self.look.keep(slot, ctx, audio)
        done = self.now()
        if self.recorder is not None:
            self.recorder.write(wave.numpy())
        self._last_wave = wave
        latency = None if heard is None else done - heard.complete_at
        if latency is None:
            delay = None
        elif placed is None:
            delay = latency + ahead / SAMPLE_RATE
        else:
            delay = None if placed.dropped else self.look.target(slot) + late - heard.complete_at
        started = None if heard is None else heard.started_at
        if started is not None and slot is not None:
            self._targets[index] = (slot, started if self.look is None else self.look.target(slot))
            if len(self._targets) > 64:  # chunks that never sounded (dropped, discarded at a stop)
                del self._targets[next(iter(self._targets))]
        stats = ChunkStats(index=index, compute_s=compute, rtf=CHUNK_SECONDS / max(compute, 1e-9),
                           buffer_s=self.ring.level / SAMPLE_RATE, underruns=self.ring.underruns, latency_s=latency,
                           play_delay_s=delay, slot=slot, ready_s=None if started is None else done - started,
                           late_s=late, catch_up=catch_up)
        with self._stats_lock:
            self.stats.append(stats)
        self.chunks += 1
        self._compute_total += compute
        if cycled:
            self._emit({"event": "seed", "index": index, "seed": base.seed, "reason": "auto_cycle"})
        if reasons:
            outcome = "silence" if x0 is None else "regenerated" if failed else "input_left_out"
            self._emit({"event": "recovered", "index": index, "outcome": outcome, "retries": failed - (x0 is None),
                        "reasons": reasons})
        event = {"event": "chunk", **asdict(stats), "input_index": None if heard is None else heard.index,
                 "state": {**base.to_json(), "effective": controls.modulated_json(),
                           "crossfade": list(xf) if xf else None}}
        del event["alignment_s"]  # not known yet: the "played" event brings it
        self._emit(event)
        if late and not catch_up:
            self._emit({"event": "late", "index": index, "slot": slot, "late_s": late, "dropped": placed.dropped,
                        "lookahead": self.cfg.lookahead, "suggested_lookahead": self.summary().suggested_lookahead})
        self._display_events(index, controls, wave, x0)
        self._collect_sounded()
        return True

    def _collect_sounded(self) -> None:
        """Alignment of the chunks that started sounding since the last call: into their stats and "played" events."""
        for index, when in self.ring.sounded():
            slot, started = self._targets.pop(index, (None, None))
            if started is None:
                continue
            error = when - started
            with self._stats_lock:
                at = len(self.stats) - (self.chunks - index)
                if 0 <= at < len(self.stats) and self.stats[at].index == index:
                    self.stats[at] = replace(self.stats[at], alignment_s=error)
            self._emit({"event": "played", "index": index, "slot": slot, "alignment_s": error})

    def _take(self, index: int) -> tuple[Controls, str, bool]:
        """The controls chunk `index` uses, its seed mode, and whether auto-cycling changed the seed for it."""
        with self._lock:
            c, cycled = self._pending, False
            if c.auto_cycle and index > 0 and index % c.auto_cycle == 0:
                c = apply_message(c, {"seed": derived_seed(c.seed, index), "mode": "crossfade"}, self.limits,
                                  now=index).controls
                self._seed_mode, cycled = "crossfade", True
            if c.morph is not None and c.morph.done(index):  # this chunk arrives, as the set values alone would
                c = replace(c, morph=None)
            self._pending, self._next = c, index + 1
            return c, self._seed_mode, cycled

    def _hear(self, audio: torch.Tensor, reasons: list[str]) -> None:
        """Make the performer's chunk context; an input that encodes to NaN/inf (or fails) is left out and said so."""
        try:
            z = self.codec.encode(audio)[0]  # (8, 64)
            if not torch.isfinite(z).all():
                reasons.append("the input chunk encoded to non-finite latents; left out of the context")
                return
            self.gen.add_context_latents(z)
        except Exception as exc:
            log.warning(f"chunk {self.chunks}: encoding the input failed ({type(exc).__name__}: {exc})",
                        exc_info=log.isEnabledFor(logging.DEBUG))
            reasons.append(f"encoding the input failed ({type(exc).__name__}: {exc}); left out of the context")

    def _render(self, as_context: bool, reasons: list[str]
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This chunk's audio (2, 32768), its latents (8, 64, normalised; None for a recovery's silence) and, when
        it became context, the chunk as it went in (add_context's re-noised copy)."""
        for _ in range(1 + self.cfg.retries):
            try:
                x0 = self.gen.draft()  # (B, 8, 64)
                if not torch.isfinite(x0).all():
                    reasons.append("non-finite latents")
                    continue
                wave = self.codec.decode_next(self.gen.latents(x0)[0]).float().cpu()  # (2, 32768)
                if not torch.isfinite(wave).all():
                    reasons.append("non-finite audio")
                    self.codec.reset()  # its streaming state may hold the bad values
                    continue
                ctx = self.gen.commit(x0, as_context)
            except Exception as exc:  # one chunk's failure must not end a performance
                reasons.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                log.warning(f"chunk {self.chunks}: {reasons[-1]}; drawing it again",
                            exc_info=log.isEnabledFor(logging.DEBUG))  # the traceback only when asked for
                self.codec.reset()
                continue
            self._failed = 0
            if self._silent:  # back from silence: fade in rather than click
                wave[:, :FADE] *= torch.linspace(0.0, 1.0, FADE)
                self._silent = False
            return wave, x0[0], ctx
        self.gen.skip()
        self._failed += 1
        if self._failed >= self.cfg.max_failed_chunks:
            raise RealtimeError(f"generation failed {self._failed} chunks in a row, each tried "
                                f"{1 + self.cfg.retries} times (last: {reasons[-1]}); stopping rather than playing "
                                f"silence. Check the checkpoint (try --weights ema), the device, or lower "
                                f"temperature and cfg_scale")
        self._silent = True
        wave = torch.zeros(CHANNELS, CHUNK_SAMPLES)
        wave[:, :FADE] = torch.from_numpy(self._tail)[:, None] * torch.linspace(1.0, 0.0, FADE)  # no click
        return wave, None, None

    def _level(self, wave: torch.Tensor, gain: float) -> torch.Tensor:
        """Apply the gain, ramped from the last chunk's; a gain above 1 lifts a chunk at most to LIMIT, and what is
        still beyond full scale is clipped, so the card, the file sinks and --save get the same, never-wrapping audio."""
        if gain > 1.0:
            peak = float(wave.abs().max())
            gain = max(1.0, min(gain, LIMIT / peak)) if peak > 0 else gain
        if self._gain is not None and gain != self._gain:
            wave = wave * torch.linspace(self._gain, gain, CHUNK_SAMPLES)
        elif gain != 1.0:
            wave = wave * gain
        self._gain = gain
        wave = wave.clamp(-1.0, 1.0)
        self._tail = wave[:, -1].numpy().copy()
        return wave

    def _display_events(self, index: int, c: Controls, wave: torch.Tensor, x0: torch.Tensor | None) -> None:
        """The opt-in "waveform" and "latents" events, each at most max_rate_hz times a second."""
        opts, now = c.events, self.clock()
        for kind, wanted in (("waveform", opts.waveform), ("latents", opts.latents and x0 is not None)):
            if not wanted or now - self._sent.get(kind, -1e9) < 1.0 / opts.max_rate_hz:
                continue
            self._sent[kind] = now
            if kind == "waveform":
                blocks = wave.reshape(CHANNELS, WAVEFORM_POINTS, -1)  # (2, 128, 256)
                self._emit({"event": "waveform", "index": index, "points": WAVEFORM_POINTS,
                            "min": _rounded(blocks.amin(-1)), "max": _rounded(blocks.amax(-1)),
                            "peak": _rounded(wave.abs().amax(-1)), "rms": _rounded(wave.square().mean(-1).sqrt())})
            else:
                self._emit({"event": "latents", "index": index, "space": "normalised", "shape": list(x0.shape),
                            "grid": _rounded(x0.float().cpu(), 3)})

    def _play(self) -> None:
        if self.look is None:  # a timeline is played from the start: its clock places the chunks
            self.ring.wait_until(lambda level: level >= self.cfg.prebuffer * CHUNK_SAMPLES, self._stop)
        if not self._stop.is_set():
            self.sink.run(self.ring, self._stop)

    def _emit(self, event: dict) -> None:
        for listener in list(self._listeners):
            listener(event)


def _rounded(t: torch.Tensor, digits: int = 4) -> list:
    """A tensor as (nested) lists of rounded floats: events stay short as JSON."""
    return np.round(t.numpy().astype(np.float64), digits).tolist()
