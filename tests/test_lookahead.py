"""Accompaniment in time (issue 14): realtime --lookahead N.

The cache takes guesses back exactly (rewind then append equals never having guessed, also after the ring wraps;
on the onnxruntime backend too), the timeline puts a chunk where it sounds at a given moment and cuts a late one
to the grid, and the engine lines its output up with a replayed performer (--input-wav): each output chunk j
starts when input chunk j started, where without lookahead it starts more than a chunk later.
"""
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from codicodec_flow import quantize
from codicodec_flow.codec import CHUNK_SAMPLES, CHUNK_SECONDS, SAMPLE_RATE
from codicodec_flow.config import ModelConfig, SampleConfig
from codicodec_flow.model import Chunk
from codicodec_flow.realtime.generator import LiveGenerator
from codicodec_flow.realtime.live_input import WavInput, _capture_latency
from codicodec_flow.realtime.lookahead import suggested_lookahead
from codicodec_flow.realtime.sinks import BLOCK, NullSink, _playback_latency
from codicodec_flow.realtime.timeline import FADE, SNAP, Timeline
from conftest import randomised_model, write_audio
from test_realtime import STATS, _cli, collect, make_engine, tiny_model
from test_realtime import ckpt  # noqa: F401  (a fixture)

CFG3 = ModelConfig(dim=64, n_layers=2, n_heads=4, cond_dim=48, context_chunks=3)
S = torch.full((1, 8), 0.02)  # context-noise times


@pytest.fixture(scope="module")
def model():
    return randomised_model(CFG3).requires_grad_(False)


def _fresh(model, chunks: list[torch.Tensor], active: int | None = None):
    """The reference: a cache that was only ever given `chunks`, appended one by one."""
    cache, mods = model.new_cache(1), model.conditioning(S)
    cache.set_active(active)
    for c in chunks:
        model.append_context(c, S, cache, mods=mods)
    return cache


# ---------------------------------------------------------------------------------------------- the cache

@pytest.mark.parametrize("n, active", [(1, None), (3, None), (3, 2)])
def test_rewind_then_append_equals_appending_the_real_chunk_in_the_first_place(model, n, active):
    """The lookahead loop on a window-3 model for 9 steps (the ring wraps): each step takes the
    guesses back, joins the real chunk and the guesses still ahead in the new chunk's first pass, and must give
    the velocities of a cache that never held any other guess."""
    g = torch.Generator().manual_seed(n)
    real, guess = torch.randn(1, 16, 8, 64, generator=g), torch.randn(1, 16, 8, 64, generator=g)
    x, t = torch.randn(1, 8, 64, generator=g), torch.full((1, 8), 0.6)
    cache = model.new_cache(1).resized(spare=n, scratch=n + 2)
    cache.set_active(active)
    ahead = 0  # guesses at the end of the context
    with torch.no_grad():
        mods = model.conditioning(S)
        for k in range(9):
            cache.rewind(ahead)
            context = [real[:, k]] + [guess[:, j] for j in range(k + 1, k + n)]  # real k, guesses k+1 .. k+n-1
            got = model.forward_cached(x, t, cache, join=[Chunk(c, S, mods, "context") for c in context])
            ahead = n - 1
            assert cache.n == k + n
            if k % 3 != 2:
                continue  # the reference is rebuilt from scratch: compare every third step (2, 5, 8)
            ref = _fresh(model, [real[:, j] for j in range(k + 1)] + context[1:], active)
            torch.testing.assert_close(got, model.forward_cached(x, t, ref), atol=1e-5, rtol=0)
            guided = model.forward_guided(x, t, cache, 2.0)  # and the unguided branch still sees nothing
            torch.testing.assert_close(guided, model.forward_guided(x, t, ref, 2.0), atol=1e-5, rtol=0)


def test_a_rewound_slot_is_hidden_until_written_and_rewind_is_bounded(model):
    cache = model.new_cache(1).resized(spare=1, scratch=3)
    g = torch.Generator().manual_seed(0)
    chunks = torch.randn(1, 6, 8, 64, generator=g)
    x, t = torch.randn(1, 8, 64, generator=g), torch.full((1, 8), 0.6)
    with torch.no_grad():
        for k in range(6):  # window 3 + 1 spare: wrapped
            model.append_context(chunks[:, k], S, cache)
        cache.rewind(1)  # chunk 5's slot now holds what chunk 1 would have been seen as: it must not be seen
        torch.testing.assert_close(model.forward_cached(x, t, cache),
                                   model.forward_cached(x, t, _fresh(model, list(chunks[:, :5].unbind(1)))),
                                   atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="can rewind 0..0"):
            cache.rewind(1)  # a second one would lose chunk 1's window neighbour for good
    with pytest.raises(ValueError, match="can rewind"):
        model.new_cache(1).rewind(1)  # nothing to take back


def test_resized_cache_keeps_its_past(model):
    g = torch.Generator().manual_seed(1)
    chunks = torch.randn(1, 5, 8, 64, generator=g)
    x, t = torch.randn(1, 8, 64, generator=g), torch.full((1, 8), 0.3)
    plain = _fresh(model, list(chunks.unbind(1)))
    with torch.no_grad():
        grown = plain.resized(spare=2, scratch=4)
        torch.testing.assert_close(model.forward_cached(x, t, grown), model.forward_cached(x, t, plain),
                                   atol=1e-5, rtol=0)
    assert grown.n == 5 and grown.slots == 5 and grown.rewindable == 0  # its old ring held the window, no more
    with torch.no_grad():
        for c in chunks[:, :2].unbind(1):
            model.append_context(c, S, grown)
    assert grown.rewindable == 2


@pytest.mark.parametrize("packed", [False, True])
def test_generator_rewinds_queued_and_cached_chunks_alike(packed, monkeypatch):
    """StreamGenerator.rewind takes back chunks still waiting to join a pass and chunks already in the cache;
    what comes after is what a generator given only the real context computes (also through packed weights,
    whose passes here carry 8 to 32 rows)."""
    monkeypatch.setattr(quantize, "MIN_PACKED_DIM", 0 if packed else 10_000)
    gen, ref = (LiveGenerator(tiny_model(), STATS, SampleConfig(solver="euler", nfe=2, seed=0), "cpu")
                for _ in range(2))
    gen.reserve_rewind(2)
    g = torch.Generator().manual_seed(2)
    ctx = torch.randn(6, 1, 8, 64, generator=g)
    x, t = torch.randn(1, 8, 64, generator=g), torch.full((1, 8), 0.5)
    with torch.inference_mode():
        for c in ctx[:3]:
            gen.add_noised_context(c)
        gen.velocity(x, t)  # joins all three in one pass
        gen.add_noised_context(ctx[3])  # waits for the next pass
        assert gen.cache.n == 3 and gen.context_length == 4
        gen.rewind(2)  # one queued, one cached
        assert gen.context_length == 2
        for c in (ctx[4], ctx[5]):
            gen.add_noised_context(c)
        for c in (ctx[0], ctx[1], ctx[4], ctx[5]):
            ref.add_noised_context(c)
        torch.testing.assert_close(gen.velocity(x, t), ref.velocity(x, t), atol=1e-5, rtol=0)
        torch.testing.assert_close(gen.generate(3), ref.generate(3), atol=1e-5, rtol=0)  # steady 8- and 16-row passes


def test_onnxruntime_cache_rewinds_by_handing_back_the_arrays_from_before():
    """OrtModel's append returns new arrays from its graph (a pure function of its inputs), so taking an append back
    is putting the arrays from before it back; a stand-in graph (keys + x) shows the bookkeeping: rewind then
    append gives the arrays of never having made the taken-back append, also past the history's length."""
    from codicodec_flow.realtime.ort_backend import OrtModel

    class Append:
        def run(self, _outputs, feeds):
            return [a + feeds["x"].sum() for a in (feeds["keys"], feeds["keys_rot"], feeds["values"])]
    ort = OrtModel.__new__(OrtModel)
    ort.cfg, ort.window, ort.active, ort.sessions = CFG3, 3, None, {"append": Append()}
    ort._history = __import__("collections").deque(maxlen=0)
    ort.reset()
    ort.keep_history(2)
    x = lambda v: np.full((1, 8, 64), v / 512, np.float32)  # noqa: E731  (sums to v)
    for k in range(5):
        if k:
            ort.rewind(2)
        ort.append(x(10 ** k), None)  # the real chunk k
        ort.append(x(1), None), ort.append(x(2), None)  # two guesses; the second ages the real one out of the history
        ort.rewind(1)
        ort.append(x(2), None)
    assert ort.n == 7 and ort.keys.flat[0] == pytest.approx(11111 + 3)  # the reals, and the last two guesses
    with pytest.raises(ValueError, match="can rewind 0..2"):
        ort.rewind(3)
    ort.reset()
    with pytest.raises(ValueError, match="can rewind 0..0"):
        ort.rewind(1)  # reset forgets the history


# ---------------------------------------------------------------------------------------------- the timeline

def test_timeline_places_a_chunk_where_it_sounds_at_the_moment_asked():
    wave = np.ones((2, 300), np.float32)
    closed = Timeline(1000, rate=1000.0)
    closed.close()
    assert closed.place(wave, 10.0, threading.Event()) is None  # no clock will ever come: None, not a hang
    tl = Timeline(8 * 1000, rate=1000.0)  # 1000 samples a second: positions read like milliseconds
    tl.read(100, sounds_at=10.0)  # the reader's clock: position 0 sounded at t = 10 s, 100 ms a block
    assert tl.underruns == 0  # nothing placed yet: silence is expected, not an underrun
    p = tl.place(wave, 10.5, mark="a")  # sounds 0.5 s after position 0
    assert (p.position, p.cut) == (500, 0) and abs(p.lead_s - 0.4) < 1e-9 and tl.level == 700
    blocks = [tl.read(100, sounds_at=10.1 + 0.1 * i) for i in range(8)]
    audio = np.concatenate(blocks, axis=1)  # positions 100 .. 899
    assert not audio[:, :400].any() and audio[:, 400:700].all() and not audio[:, 700:].any()
    assert tl.sounded() == [("a", pytest.approx(10.5))]
    assert tl.underruns == 1  # the block from 800 ran past what was placed
    assert not tl.read(100, sounds_at=10.9).any()  # played positions were cleared: nothing comes round again


def test_a_late_chunk_is_cut_to_the_grid_and_one_wholly_past_is_dropped():
    tl = Timeline(8 * 1000, rate=1000.0)
    tl.read(100, sounds_at=0.0)
    tl.read(100, sounds_at=0.1)  # the reader is at 200
    late = tl.place(np.ones((2, 1000), np.float32), 0.05, mark="late")  # belonged at 50: 150 samples late
    assert (late.position, late.cut, late.dropped) == (50, 150, False) and late.lead_s == pytest.approx(-0.15)
    head = tl.read(FADE + 100, sounds_at=0.2)
    assert head[0, 0] == 0.0 and head[0, FADE - 1] == pytest.approx(1.0, abs=1e-2) and head[0, FADE:].all()
    assert tl.sounded() == [("late", pytest.approx(0.2))]  # its first sound is 150 ms after its slot
    past = tl.place(np.ones((2, 100), np.float32), 0.3)  # 0.3 .. 0.4 s: the reader is already at 0.78 s
    assert past.dropped
    whole = tl.place(np.ones((2, 1000), np.float32), 0.7, whole=True)  # a catch-up chunk plays whole or not at all
    assert whole.dropped and tl.level == 1050 - (FADE + 300)


def test_chunks_within_snap_of_the_previous_end_join_it_exactly():
    tl = Timeline(48_000 * 4, rate=48_000.0)
    tl.read(1, sounds_at=100.0)
    a = tl.place(np.ones((2, 4800), np.float32), 100.1)
    b = tl.place(np.ones((2, 4800), np.float32), 100.2 + 0.5 * SNAP)  # a card's timestamp jitter
    c = tl.place(np.ones((2, 4800), np.float32), 100.5)  # a real gap stays a gap
    assert a.position == 4800 and b.position == a.position + 4800 and c.position == 24_000


def test_reported_latencies_come_from_portaudios_timestamps_else_the_streams_figure():
    stream = SimpleNamespace(latency=0.025)
    assert _playback_latency(SimpleNamespace(outputBufferDacTime=5.04, currentTime=5.0), stream) == pytest.approx(0.04)
    assert _playback_latency(SimpleNamespace(outputBufferDacTime=0.0, currentTime=5.0), stream) == 0.025  # not reported
    assert _playback_latency(None, None) == 0.0
    assert _capture_latency(SimpleNamespace(inputBufferAdcTime=4.99, currentTime=5.0), stream) == pytest.approx(0.01)
    assert _capture_latency(SimpleNamespace(inputBufferAdcTime=0.0, currentTime=5.0), stream) == 0.025


def test_suggested_lookahead_is_the_smallest_that_fits():
    period = CHUNK_SECONDS
    assert suggested_lookahead([], 0.0, period) is None
    assert suggested_lookahead([period + 0.1] * 20, 0.043, period) == 2  # a chunk + 143 ms: one chunk ahead fits
    assert suggested_lookahead([2 * period + 0.01] * 20, 0.0, period) == 3
    assert suggested_lookahead([0.01] * 20, 0.0, period) == 1


# ---------------------------------------------------------------------------------------------- the engine

class SimClock:
    """Simulated time for a replayed performer: it moves only while the performer is waited for (WavInput's
    sleep_until) or a test spends it (`spend`), never while the model computes; the sound card plays up to each
    new moment before it is reached. So alignment is measured exactly however busy the machine is."""

    def __init__(self):
        self.t, self.cards = 0.0, []

    def now(self) -> float:
        return self.t

    def sleep_until(self, t: float, stop: threading.Event) -> bool:
        for card in self.cards:
            card.advance(t)
        self.t = max(self.t, t)
        return stop.is_set()

    def spend(self, seconds: float) -> None:
        """Compute that takes `seconds` of the performer's time (a slow generator)."""
        self.sleep_until(self.t + seconds, threading.Event())


class SimCard(NullSink):
    """A sound card in simulated time: from the moment playback starts (at once with lookahead, else when the
    prebuffer is full, as the engine's player does), block n sounds at start + n * 2048 / 48000 and is taken from
    the ring when the clock reaches that moment. The engine's player thread only plays out what is left at the end."""

    def __init__(self, clock: SimClock):
        super().__init__(paced=True)
        self.clock, self.engine, self.start, self.n = clock, None, None, 0
        self._lock = threading.Lock()
        clock.cards.append(self)

    def advance(self, t: float) -> None:
        with self._lock:
            e = self.engine
            if self.start is None and (e.look is not None or e.ring.level >= e.cfg.prebuffer * CHUNK_SAMPLES):
                self.start = self.clock.now()
            while self.start is not None and self.start + self.n * BLOCK / SAMPLE_RATE <= t:
                self._take()

    def _take(self) -> bool:
        due = self.start + self.n * BLOCK / SAMPLE_RATE
        self.n += 1
        return self.engine.ring.read(BLOCK, False, sounds_at=due) is not None

    def run(self, ring, stop) -> None:
        self.advance(self.clock.now())  # lookahead: the card's clock starts with the engine
        while not (ring.closed or stop.is_set()):
            stop.wait(0.002)
        with self._lock:
            self.start = self.clock.now() if self.start is None else self.start
            while not stop.is_set() and self._take():  # the end: what is left plays out, time moving with it
                self.clock.t = max(self.clock.t, self.start + self.n * BLOCK / SAMPLE_RATE)


def _run(tmp_path, lookahead: int, chunks: int = 6, compute: float = 0.0, listen: str = "input", prebuffer: int = 1,
         before=None):
    """A session against a performer replayed from a WAV in simulated time; `compute`: seconds of the performer's
    time each chunk's generation takes."""
    clock = SimClock()
    wav = write_audio(tmp_path / "performer.wav", chunks * CHUNK_SECONDS + 0.1)
    card = SimCard(clock)
    engine = make_engine(card, max_chunks=None, prebuffer=prebuffer, lookahead=lookahead, listen=listen,
                         source=WavInput(wav, paced=True, clock=clock))
    card.engine = engine
    if compute:
        draft = engine.gen.draft
        engine.gen.draft = lambda *a, **kw: (clock.spend(compute), draft(*a, **kw))[1]
    if before is not None:
        before(engine)
    events = collect(engine)
    return engine, engine.run(), events


def test_lookahead_chunks_start_with_the_performers_chunks(tmp_path, monkeypatch):
    """--input-wav with --lookahead 3: output chunk j starts when the performer starts input chunk j, to the sample."""
    passes, made = [], {}  # (chunk being made, roles of the pass): what each chunk costs
    model = tiny_model()
    run_chunks = model._run_chunks
    monkeypatch.setattr(model, "_run_chunks", lambda chunks, cache: (
        passes.append((made["engine"].chunks, tuple(c.role for c in chunks))), run_chunks(chunks, cache))[1])
    engine, summary, events = _run(tmp_path, 3, before=lambda e: made.update(engine=e))
    rows = summary.per_chunk
    assert [r.slot for r in rows] == list(range(1, 6 + 3))  # input 0 makes slots 1..3 (a catch-up burst), then k + 3
    assert [r.catch_up for r in rows] == [True] * 3 + [False] * 5
    assert [r.late_s > 0 for r in rows] == [True] + [False] * 7  # slot 1 was due when input 0 was complete
    assert rows[0].alignment_s is None  # so that guess was not played; every other chunk was, on its slot
    for r in rows[1:]:
        assert abs(r.alignment_s) < 1e-4, r  # a sample's rounding (21 us)
    assert summary.aligned_chunks == 7 and summary.alignment_max_s < 1e-4 and summary.late_chunks == 0
    assert summary.suggested_lookahead == 2  # instant compute: one chunk of input and one block of the card
    played = [e for e in events if e["event"] == "played"]
    assert [e["slot"] for e in played] == list(range(2, 9))
    assert events[0]["event"] == "ready" and events[0]["lookahead"] == 3 and events[-1]["event"] == "end"
    assert events[-1]["aligned_chunks"] == 7  # "end" waits for the last chunks to sound
    # the context: the real chunks 0..5, then the model's guesses for slots 6..8 (the last still queued)
    assert engine.gen.context_length == 6 + 3 and [gs.slot for gs in engine.look.guesses] == [6, 7, 8]
    # constant cost: a regular chunk is 4 passes (euler, NFE 4) and nothing else; the real chunk and the two guesses
    # put back ride along the first (3 context chunks, then the new one), the later three read the cache only
    for r in rows[3:]:
        assert [roles for i, roles in passes if i == r.index] == [("context",) * 3 + ("cond",)] + [("cond",)] * 3
    print(f"\nlookahead 3, alignment per chunk (s): {[r.alignment_s for r in rows]}")


def test_without_lookahead_each_chunk_starts_a_chunk_and_its_play_delay_late(tmp_path):
    engine, summary, _ = _run(tmp_path, 0, prebuffer=2)
    rows = summary.per_chunk
    assert [r.slot for r in rows] == list(range(6)) and summary.aligned_chunks == 6
    block = BLOCK / SAMPLE_RATE
    assert rows[0].alignment_s == pytest.approx(2 * CHUNK_SECONDS)  # chunk 0 waits for chunk 1: playback starts
    for r in rows[1:]:  # input chunk j is complete a chunk after it started; then it waits play_delay to sound
        # (and the rest of the block the card took last, which play_delay, counting the ring alone, leaves out)
        assert CHUNK_SECONDS + r.play_delay_s < r.alignment_s <= CHUNK_SECONDS + r.play_delay_s + block + 1e-9, r
    # instant compute and prebuffer 2: a chunk to complete the input, then the chunk before it plays out
    assert summary.alignment_mean_s == pytest.approx(2 * CHUNK_SECONDS)
    assert summary.alignment_max_s < 2 * CHUNK_SECONDS + block
    assert summary.suggested_lookahead == 2
    print(f"\nno lookahead, alignment per chunk (s): {[round(r.alignment_s, 4) for r in rows]}; "
          f"play_delay {[round(r.play_delay_s, 4) for r in rows]}")


def test_a_generator_too_slow_for_its_lookahead_says_so_and_never_falls_behind(tmp_path):
    """--lookahead 1 cannot be in time (the chunk for slot k + 1 is due when input chunk k completes): with 0.1 s of
    compute every chunk misses its slot by that and up to one block of the card, is cut to the grid (late does not
    pile up), and the engine says so in "late" events and suggests 2. With --lookahead 2 the same compute fits."""
    _, summary, events = _run(tmp_path, 1, chunks=4, compute=0.1)
    late = [e for e in events if e["event"] == "late"]
    assert len(late) == summary.late_chunks == 4 and summary.dropped_chunks == 0
    for e, r in zip(late, summary.per_chunk):
        assert 0.1 < e["late_s"] <= 0.1 + BLOCK / SAMPLE_RATE and e["suggested_lookahead"] == 2
        assert r.alignment_s == pytest.approx(r.late_s, abs=1e-4)  # it sounds exactly that late, then on the grid
    assert summary.suggested_lookahead == 2
    _, fits, events = _run(tmp_path, 2, chunks=4, compute=0.1)
    assert fits.late_chunks == 0 and not [e for e in events if e["event"] == "late"] and fits.alignment_max_s < 1e-4


def test_mix_hears_the_band_as_it_sounded_in_that_slot(tmp_path, monkeypatch):
    """--listen mix with lookahead: input chunk k is encoded together with what the band played in slot k."""
    encoded, played = [], {}

    def spy(engine):
        encode = engine.codec.encode
        monkeypatch.setattr(engine.codec, "encode", lambda wave: (encoded.append(wave.clone()), encode(wave))[1])
        keep = engine.look.keep
        engine.look.keep = lambda slot, ctx, wave: (played.__setitem__(slot, wave.copy()), keep(slot, ctx, wave))
    _run(tmp_path, 2, chunks=3, listen="mix", before=spy)
    performer = WavInput(tmp_path / "performer.wav", paced=False)
    inputs = [performer.read(threading.Event()).audio for _ in range(3)]
    assert len(encoded) == 3
    torch.testing.assert_close(encoded[0], inputs[0])  # nothing played in slot 0
    assert played[2].any()  # slot 2 sounded whole (made after input 0, due after input 1)
    torch.testing.assert_close(encoded[2], inputs[2] + torch.from_numpy(played[2]))


def test_lookahead_with_input_wav_through_the_command(ckpt, tmp_path, capsys):
    """`realtime --input-wav ... --lookahead 2 --sink null` end to end at real time (auto pace is real time with
    a lookahead): the summary reports the alignment; errors for what cannot work are one line."""
    band = write_audio(tmp_path / "band.wav", 3 * CHUNK_SECONDS + 0.1)
    base = ["realtime", "--ckpt", str(ckpt), "--device", "cpu", "--sink", "null", "--plain"]
    assert _cli([*base, "--input-wav", str(band), "--lookahead", "2"]) == 0
    out = capsys.readouterr().out
    assert "--lookahead 2)" in out and "alignment (output chunk j starts" in out and "(--lookahead 2)" in out
    assert _cli([*base, "--lookahead", "2"]) == 2
    assert "--lookahead lines the band up with a performer" in capsys.readouterr().err
    assert _cli([*base, "--input-wav", str(band), "--lookahead", "2", "--pace", "fast"]) == 2
    assert "not fast" in capsys.readouterr().err
    assert _cli([*base, "--input-wav", str(band), "--lookahead", "9"]) == 2
    assert "--lookahead must be 0..8" in capsys.readouterr().err
