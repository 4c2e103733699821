"""Real-time streaming, headless: controls, seed crossfades, steering, the engine with null and wav sinks,
throttling and underruns, live input from a WAV, the command end to end and the benchmark."""
import functools
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch

from codicodec_flow.checkpoint import inference_dict, load_bundle, save_checkpoint
from codicodec_flow.codec import CHUNK_SAMPLES, CHUNK_SECONDS, load_codec
from codicodec_flow.config import LIVE_SAMPLING, FlowConfig, ModelConfig, SampleConfig
from codicodec_flow.errors import FlowError
from codicodec_flow.model import FlowDiT
from codicodec_flow.evaluation.bench import sustained_rtf
from codicodec_flow.realtime.engine import Engine, EngineConfig
from codicodec_flow.realtime.generator import LiveGenerator
from codicodec_flow.realtime.live_input import WavInput
from codicodec_flow.realtime.noise import NoiseSource
from codicodec_flow.realtime.sinks import AudioDeviceError, NullSink, WavSink, WavWriter, open_sink
from codicodec_flow.realtime.state import ControlError, Controls, Limits, apply_message
from codicodec_flow.solvers import steps_for
from codicodec_flow.latents import LatentStats
from conftest import randomised_model, write_audio

CFG = ModelConfig(dim=32, n_layers=1, n_heads=2, cond_dim=32, context_chunks=4)
STATS = LatentStats(torch.full((64,), -1.0), torch.full((64,), 0.8), 100)
W = CFG.context_chunks


@functools.lru_cache(maxsize=1)
def tiny_model() -> FlowDiT:
    return randomised_model(CFG, scale=0.02).requires_grad_(False)


def make_gen(seed: int = 0) -> LiveGenerator:
    return LiveGenerator(tiny_model(), STATS, SampleConfig(solver="euler", nfe=4, seed=seed), "cpu")


def make_engine(sink=None, max_chunks: int | None = 6, controls: Controls | None = None, **kw) -> Engine:
    parts = {k: kw.pop(k) for k in ("recorder", "source", "warmup") if k in kw}
    return Engine(make_gen(), load_codec("spectral"), sink or NullSink(), EngineConfig(max_chunks=max_chunks, **kw),
                  controls or Controls(context_chunks=W), **parts)


def collect(engine: Engine) -> list[dict]:
    events: list[dict] = []
    engine.subscribe(events.append)
    return events


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("rt") / "ema.pt"
    save_checkpoint(inference_dict(tiny_model().state_dict(), CFG, FlowConfig(), STATS,
                                   {"name": "spectral", "version": "1"}, 7), path)
    return path


# ---------------------------------------------------------------------------------------------- controls

def test_commands_change_controls_and_nudges_clamp():
    lim = Limits(window=W)
    c = Controls(context_chunks=W)
    c2 = apply_message(c, {"set": {"temperature": 0.8, "solver": "heun"}, "cfg_scale": 2}, lim).controls
    assert (c2.temperature, c2.solver, c2.cfg_scale) == (0.8, "heun", 2.0) and c.temperature == 1.0
    c3 = apply_message(c2, {"add": {"temperature": -0.3, "context_chunks": 5}}, lim).controls
    assert c3.temperature == 0.5 and c3.context_chunks == W  # nudges stop at the window
    c4 = apply_message(c3, {"channel_bias": {"index": 3, "value": 0.5}, "token_scale": [0.5] * 8}, lim).controls
    assert c4.channel_bias[3] == 0.5 and sum(c4.channel_bias) == 0.5 and c4.token_scale == (0.5,) * 8
    c5 = apply_message(c4, {"add": {"token_bias": {"index": 7, "value": 0.25}}}, lim).controls
    assert c5.token_bias[7] == 0.25 and c5.steered
    upd = apply_message(c5, {"seed": 9, "mode": "cut"}, lim)
    assert upd.controls.seed == 9 and upd.seed_mode == "cut"
    back = apply_message(upd.controls, {"reset": "steering"}, lim).controls
    assert not back.steered and back.temperature == 0.5 and back.seed == 9
    start = Controls(context_chunks=W, temperature=0.7)
    every = apply_message(c5, {"reset": "all"}, Limits(W, start)).controls
    assert every == replace(start, seed=c5.seed)  # everything back to the start values but the seed
    assert apply_message(c, {"quit": True}, lim).quit and apply_message(c, {"get": "state"}, lim).get


@pytest.mark.parametrize("msg, needle", [
    ({"set": {"temperature": 9.0}}, "temperature must lie in"),
    ({"set": {"temperature": "hot"}}, "finite number"),
    ({"set": {"temperature": float("nan")}}, "finite number"),
    ({"set": {"nfe": 2.5}}, "nfe must be an integer"),
    ({"set": {"nfe": True}}, "nfe must be an integer"),
    ({"context_chunks": W + 1}, f"1..{W}"),
    ({"solver": "magic"}, "unknown solver"),
    ({"token_scale": [1.0] * 7}, "needs 8 numbers"),
    ({"channel_bias": {"index": 64, "value": 0.1}}, "index must be an integer 0..63"),
    ({"channel_bias": {"idx": 1, "value": 0.1}}, "element form"),
    ({"explode": True}, "unknown command 'explode'"),
    ({"set": {"volume": 1}}, "unknown control 'volume'"),
    ({"seed": -1}, "seed must be an integer"),
    ({"seed": 3, "mode": "blend"}, "mode must be one of"),
    ({"mode": "cut"}, '"mode" goes with "seed"'),
    ({"solver": ["euler"]}, "unknown solver"),
    ({"quit": 1}, "the only form of quit"),
    ({"reset": "everything"}, "reset expects"),
    ({"add": {"solver": 1}}, "cannot be nudged"),
    ({"temperature": 0.5, "cfg_scale": -1}, "cfg_scale must lie in"),  # all or nothing: the valid half is dropped
    ([1, 2], "must be a non-empty JSON object"),
    ({}, "must be a non-empty JSON object"),
])
def test_malformed_commands_raise_and_change_nothing(msg, needle):
    c = Controls(context_chunks=W)
    with pytest.raises(ControlError, match=None) as err:
        apply_message(c, msg, Limits(W))
    assert needle in str(err.value)
    assert c == Controls(context_chunks=W)


def test_any_json_value_in_any_place_is_handled():
    """Whatever a front end sends, the answer is the new state or a ControlError: never a crash."""
    import itertools
    import random
    values = [None, True, 1, -1, 0.5, 1e308, "x", "random", [], [1] * 8, [0.5] * 64, {}, {"index": 1, "value": 2},
              {"index": 1, "value": "x"}, [[1]]]
    keys = ["set", "add", "seed", "mode", "reset", "get", "help", "quit", "solver", "nfe", "temperature",
            "context_chunks", "token_scale", "channel_bias"]
    rng = random.Random(0)
    c = Controls(context_chunks=W)
    for key, value in itertools.product(keys, values):
        mode = rng.choice(values)
        for msg in ({key: value}, {"set": {key: value}}, {"add": {key: value}}, {key: value, "mode": mode}):
            try:
                apply_message(c, msg, Limits(W))
            except ControlError:
                pass


def test_nfe_presets_round_to_whole_solver_steps():
    assert [steps_for("heun", n) for n in (1, 2, 4, 8)] == [1, 1, 2, 4]  # the NFE keys 1..4 adapt to the solver
    assert [steps_for("rk4", n) for n in (1, 2, 4, 8)] == [1, 1, 1, 2]
    assert Controls(solver="heun", nfe=1).evals == 2


# ---------------------------------------------------------------------------------------------- seeds and steering

def test_crossfaded_noise_keeps_unit_variance_and_lands_on_the_new_stream():
    src, old, new = NoiseSource(0), torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    src.draw((4096,)), torch.randn(4096, generator=old)
    src.advance()
    src.reseed(1, crossfade_chunks=4)
    for i in range(1, 6):
        got = src.draw((4096,))
        a = min(i, 4) / 4 * np.pi / 2
        eo, en = torch.randn(4096, generator=old), torch.randn(4096, generator=new)
        want = en if i > 4 else np.cos(a) * eo + np.sin(a) * en
        torch.testing.assert_close(got, want)
        assert 0.9 < got.std() < 1.1  # no dip in the noise level anywhere in the blend
        src.advance()
    assert src.crossfade is None and src.seed == 1


def test_seed_crossfade_moves_gradually_while_a_cut_switches_at_once():
    def run(mode, n=9, at=3):
        g, c = make_gen(), Controls(context_chunks=W)
        g.configure(c)
        out = []
        for k in range(n):
            if k == at and mode:
                g.configure(replace(c, seed=1), mode, crossfade_chunks=4)
            out.append(g.next_chunk()[0])
        return torch.stack(out)  # (n, 8, 64)

    ref, fade, cut = run(None), run("crossfade"), run("cut")
    ordinary = torch.stack([(ref[k + 1] - ref[k]).norm() for k in range(8)])  # chunk-to-chunk change
    dev_fade = torch.stack([(fade[k] - ref[k]).norm() for k in range(9)])  # distance from the old seed's path
    dev_cut = torch.stack([(cut[k] - ref[k]).norm() for k in range(9)])
    assert dev_fade[:3].max() == dev_cut[:3].max() == 0  # nothing changes before the command
    assert dev_cut[3] > 0.7 * ordinary.mean()  # a cut is at once a different stream
    steps = dev_fade[3:7] - torch.cat([dev_fade[2:3], dev_fade[3:6]])
    assert (steps > 0).all() and steps.max() < 0.5 * ordinary.mean()  # a crossfade drifts away gradually
    changes = torch.stack([(fade[k + 1] - fade[k]).norm() for k in range(8)])
    assert changes.max() <= 1.2 * ordinary.max()  # no jump: chunk to chunk it moves like any other stream
    assert (fade[7:] - cut[7:]).norm() < 0.02 * ordinary.mean()  # then it runs on the new seed's noise


def test_steering_shapes_the_chunk_and_the_model_hears_it():
    steer = replace(Controls(context_chunks=W), token_scale=(0.0,) + (1.0,) * 7,
                    channel_bias=(0.5,) + (0.0,) * 63)
    g = make_gen()
    g.configure(steer)
    z = g.next_chunk()[0]  # raw latents (8, 64)
    x = (z - STATS.mean) / STATS.std  # back to the normalised space where steering acts
    torch.testing.assert_close(x[0], torch.tensor([0.5] + [0.0] * 63), atol=1e-5, rtol=0)  # token 0 scaled to 0
    plain = make_gen()
    plain.configure(Controls(context_chunks=W))
    assert torch.allclose(plain.next_chunk()[0, 1:, 1:], z[1:, 1:], atol=1e-5)  # the rest is untouched
    g.configure(Controls(context_chunks=W))  # steering off again: the next chunk still differs, because
    assert not torch.allclose(g.next_chunk(), plain.next_chunk(), atol=1e-3)  # the steered chunk is its context


# ---------------------------------------------------------------------------------------------- the engine

def _boundary_check(wave: np.ndarray, chunks: int) -> None:
    """No gaps: no exact silence at any boundary and no jump there beyond the jumps inside chunks."""
    jumps = np.abs(np.diff(wave, axis=0)).max(axis=1)  # (N - 1,)
    inside = np.delete(jumps, [k * CHUNK_SAMPLES - 1 for k in range(1, chunks)])
    for k in range(1, chunks):
        b = k * CHUNK_SAMPLES
        assert np.abs(wave[b - 64:b + 64]).max() > 0, f"silence at the boundary of chunk {k}"
        assert jumps[b - 1] <= inside.max(), f"a click at the boundary of chunk {k}"


def test_fixed_chunks_saved_without_gaps(tmp_path):
    n = 6
    engine = make_engine(WavSink(tmp_path / "played.wav", paced=False), max_chunks=n,
                         recorder=WavWriter(tmp_path / "saved.wav"))
    events = collect(engine)
    summary = engine.run()
    engine.sink.close(), engine.recorder.close()
    chunks = [e for e in events if e["event"] == "chunk"]
    assert summary.chunks == n and [e["index"] for e in chunks] == list(range(n)) and events[-1]["event"] == "end"
    saved, sr = sf.read(tmp_path / "saved.wav", dtype="float32")
    played, _ = sf.read(tmp_path / "played.wav", dtype="float32")
    assert sr == 48_000 and saved.shape == played.shape == (n * CHUNK_SAMPLES, 2)
    np.testing.assert_array_equal(saved, played)  # unpaced: every sample played, none padded
    _boundary_check(saved, n)
    assert all(e["compute_s"] > 0 and e["rtf"] > 0 and e["underruns"] == 0 for e in chunks)


def test_controls_land_between_chunks():
    engine = make_engine(max_chunks=6)
    events = collect(engine)

    def steer(ev):
        if ev.get("index") == 2:  # sent while chunk 2 is done: chunk 3 is the first to use it
            engine.submit({"set": {"temperature": 0.5, "solver": "heun", "nfe": 2, "context_chunks": 2}})
    engine.subscribe(steer)
    engine.run()
    states = [e["state"] for e in events if e["event"] == "chunk"]
    assert [s["temperature"] for s in states] == [1.0] * 3 + [0.5] * 3
    assert [s["solver"] for s in states] == [LIVE_SAMPLING.solver] * 3 + ["heun"] * 3 and states[-1]["steps"] == 1
    assert engine.gen.cache.active == 2 and engine.gen.steps == 1 and engine.gen.cfg.temperature == 0.5


def test_seed_change_through_the_engine_reports_the_crossfade():
    engine = make_engine(max_chunks=7, controls=Controls(context_chunks=W, crossfade_chunks=3))
    events = collect(engine)
    engine.subscribe(lambda ev: ev.get("index") == 1 and engine.submit({"seed": 42}))
    engine.run()
    states = [e["state"] for e in events if e["event"] == "chunk"]
    assert [s["seed"] for s in states] == [0, 0] + [42] * 5
    assert [s["crossfade"] for s in states] == [None, None, [1, 3], [2, 3], [3, 3], None, None]


def test_paced_sink_throttles_instead_of_growing_the_buffer(tmp_path):
    speed, n = 8.0, 8  # a clock 8x real time: the same behaviour as real time, in a tenth of the wait
    engine = make_engine(WavSink(tmp_path / "paced.wav", paced=True, speed=speed), max_chunks=n, prebuffer=2)
    events = collect(engine)
    summary = engine.run()
    engine.sink.close()
    assert summary.underruns == 0
    assert engine.ring.peak <= engine.ring.capacity and engine.ring.peak <= 3 * CHUNK_SAMPLES  # prebuffer + 1
    assert max(e["buffer_s"] for e in events if e["event"] == "chunk") <= 3 * CHUNK_SECONDS + 1e-9
    assert summary.wall_s > 0.7 * (n - 2) * CHUNK_SECONDS / speed  # it waited for the clock, not ran ahead
    assert sf.info(str(tmp_path / "paced.wav")).frames == n * CHUNK_SAMPLES


def test_underruns_are_counted_when_generation_is_too_slow():
    engine = make_engine(NullSink(paced=True, speed=4.0), max_chunks=4, prebuffer=1)
    fast = engine.gen.draft

    def slow(*a, **kw):
        time.sleep(0.35)  # 2x slower than the 4x clock's 0.17 s per chunk
        return fast(*a, **kw)
    engine.gen.draft = slow
    summary = engine.run()
    assert summary.underruns >= 2 and summary.rtf < 2.0


def test_quit_stops_an_endless_stream():
    engine = make_engine(NullSink(paced=True, speed=4.0), max_chunks=None)
    engine.subscribe(lambda ev: ev.get("index") == 2 and engine.submit({"quit": True}))
    summary = engine.run()
    assert 3 <= summary.chunks <= 4


# ---------------------------------------------------------------------------------------------- live input

@pytest.mark.parametrize("listen", ["input", "mix"])
def test_accompaniment_follows_the_input_and_reports_latency(tmp_path, listen):
    wav = write_audio(tmp_path / "band.wav", 5 * CHUNK_SECONDS + 0.2, sr=44_100)  # 5 whole chunks and a tail
    engine = make_engine(max_chunks=None, listen=listen, source=WavInput(wav, paced=False))
    events = collect(engine)
    summary = engine.run()
    chunks = [e for e in events if e["event"] == "chunk"]
    assert summary.chunks == 5 and [e["input_index"] for e in chunks] == list(range(5))
    assert engine.gen.cache.n == 5  # only the performer's chunks became context, not the model's guesses
    assert all(0 < e["latency_s"] <= e["play_delay_s"] for e in chunks)
    assert summary.latency_mean_s > 0 and summary.latency_p95_s >= summary.latency_mean_s


def test_wav_input_is_paced_like_a_performer(tmp_path):
    import threading
    wav = write_audio(tmp_path / "in.wav", 3 * CHUNK_SECONDS)
    src, stop, t0 = WavInput(wav, paced=True, speed=10.0), threading.Event(), time.perf_counter()
    got = [src.read(stop) for _ in range(4)]
    assert [c.index for c in got[:3]] == [0, 1, 2] and got[3] is None
    for c in got[:3]:
        assert c.audio.shape == (2, CHUNK_SAMPLES)
        assert c.complete_at - t0 >= (c.index + 1) * CHUNK_SECONDS / 10 - 0.01  # not before its last sample


def test_short_input_is_refused(tmp_path):
    import threading
    src = WavInput(write_audio(tmp_path / "tiny.wav", 0.2), paced=False)
    with pytest.raises(FlowError, match="shorter than one codec chunk"):
        src.read(threading.Event())


# ---------------------------------------------------------------------------------------------- sinks, command, bench

def test_sounddevice_sink_without_portaudio_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # what a machine without PortAudio looks like
    with pytest.raises(AudioDeviceError, match="PortAudio not found.*--sink wav"):
        open_sink("sounddevice")


def test_sounddevice_sink_on_this_machine():
    try:
        import sounddevice  # noqa: F401
    except OSError:
        with pytest.raises(AudioDeviceError, match="PortAudio"):
            open_sink("sounddevice")
    else:
        pytest.skip("PortAudio is installed here")


def _cli(argv: list[str]) -> int:
    """`codicodec-flow ...` as the console script runs it."""
    from codicodec_flow.commands.cli import main
    return main(argv)


def test_command_end_to_end(ckpt, tmp_path, capsys):
    argv = ["realtime", "--ckpt", str(ckpt), "--device", "cpu", "--sink", "null", "--max-chunks", "5",
            "--save", str(tmp_path / "s.wav"), "--temperature", "0.9"]
    assert _cli(argv) == 0
    out = capsys.readouterr().out
    assert out.count("chunk ") >= 5 and "sustained" in out and "underruns 0" in out and "temp 0.90" in out
    assert sf.info(str(tmp_path / "s.wav")).frames == 5 * CHUNK_SAMPLES
    band = write_audio(tmp_path / "band.wav", 3 * CHUNK_SECONDS + 0.1)
    assert _cli(["realtime", "--ckpt", str(ckpt), "--device", "cpu", "--sink", "wav", "--out", str(tmp_path / "o.wav"),
                 "--pace", "fast", "--input-wav", str(band), "--listen", "mix", "--prompt-wav", str(band)]) == 0
    assert "latency: mean" in capsys.readouterr().out and sf.info(str(tmp_path / "o.wav")).frames == 3 * CHUNK_SAMPLES


@pytest.mark.parametrize("extra, needle", [
    (["--sink", "wav"], "--sink wav needs --out"),
    (["--sink", "null", "--temperature", "7"], "temperature must lie in"),
    (["--sink", "null", "--context-chunks", "9"], f"context_chunks must be an integer 1..{W}"),
    (["--sink", "null", "--prebuffer", "0"], "--prebuffer must be at least 1"),
    (["--sink", "null", "--control", "udp:5"], "--control 'udp:5'"),
])
def test_command_errors_are_one_line(ckpt, tmp_path, capsys, extra, needle):
    assert _cli(["realtime", "--ckpt", str(ckpt), "--device", "cpu", "--max-chunks", "1", *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_sustained_rtf_benchmark_reports(ckpt):
    """The figure `bench` prints: structure only (speed is a benchmark figure, never a test threshold)."""
    result = sustained_rtf(load_bundle(ckpt), load_codec("spectral"), SampleConfig(solver="euler", nfe=4),
                           n_chunks=20)
    assert result["chunks"] == 20 and result["underruns"] == 0 and result["nfe"] == 4
    assert result["rtf"] > 0 and result["wall_rtf"] > 0 and result["compute_p95_s"] > 0


def test_ctrl_c_during_generation_ends_the_session_cleanly(monkeypatch):
    """Generation runs on the caller's thread: Ctrl-C there must stop the player and leave a usable summary."""
    engine = make_engine(max_chunks=50)
    real = engine.gen.draft
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(engine.gen, "draft", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    assert engine.stopping and engine.wait(2.0) and engine.summary().chunks == 2


@pytest.mark.parametrize("threads", [None, 1, 3])
def test_threads_flag_sets_torchs_threads_while_generating(ckpt, capsys, monkeypatch, threads):
    """--threads N generates on N intra-op threads (default: the live default) and restores torch's count after."""
    from codicodec_flow.util.devices import live_threads
    seen = []
    real_run = Engine.run
    monkeypatch.setattr(Engine, "run", lambda self: seen.append(torch.get_num_threads()) or real_run(self))
    before = torch.get_num_threads()
    extra = [] if threads is None else ["--threads", str(threads)]
    assert _cli(["realtime", "--ckpt", str(ckpt), "--device", "cpu", "--sink", "null", "--max-chunks", "2",
                 "--plain", "--no-keys", *extra]) == 0
    want = live_threads() if threads is None else threads
    assert seen == [want] and torch.get_num_threads() == before
    assert f"with {want} thread" in capsys.readouterr().out


@pytest.mark.parametrize("cores, threads", [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (64, 4)])
def test_live_thread_default_leaves_half_the_cores_to_other_programs(monkeypatch, cores, threads):
    import os
    from codicodec_flow.util.devices import live_threads
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert live_threads() == threads


def test_threads_must_be_positive(ckpt, capsys):
    assert _cli(["realtime", "--ckpt", str(ckpt), "--device", "cpu", "--sink", "null", "--max-chunks", "1",
                 "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
