"""The live rig (issue 14): LFOs, morphs, presets, randomised steering, seed auto-cycling, live crossfade length,
master gain, display events, recovery from NaN/inf or failing chunks, raw weights, and a long headless session."""
import json
import os
import tracemalloc
from collections import deque
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from codicodec_flow.checkpoint import load_bundle, load_weights, save_checkpoint
from codicodec_flow.codec import CHUNK_SAMPLES, CHUNK_SECONDS
from codicodec_flow.config import FlowConfig, SampleConfig
from codicodec_flow.errors import CheckpointError
from codicodec_flow.realtime.engine import FADE, LIMIT, Engine, EngineConfig, RealtimeError
from codicodec_flow.realtime.generator import LiveGenerator
from codicodec_flow.realtime.keyboard import KeyControls
from codicodec_flow.realtime.live_input import WavInput
from codicodec_flow.realtime.modulation import derived_seed
from codicodec_flow.realtime.osc import event_messages, osc_command
from codicodec_flow.realtime.presets import PresetStore, default_dir
from codicodec_flow.realtime.protocol import handle_line
from codicodec_flow.realtime.session import RealtimeConfig, run_realtime
from codicodec_flow.realtime.sinks import NullSink
from codicodec_flow.realtime.state import ControlError, Controls, EventOptions, Limits, apply_message, modulate
from conftest import write_audio
from test_realtime import CFG, STATS, W, _cli, ckpt, tiny_model  # noqa: F401  (ckpt is a fixture)

LIM = Limits(W)
BASE = Controls(context_chunks=W)


class LatentCodec:
    """A codec that costs next to nothing: each token's first two channels, squashed, held for 4096 samples."""
    name, version, device, lookahead_samples = "latent-hold", "1", torch.device("cpu"), 0

    def __init__(self, nan_at: tuple[int, ...] = (), level: float | None = None, encode_nan: bool = False):
        self.nan_at, self.level, self.calls, self.resets, self.encode_nan = set(nan_at), level, 0, 0, encode_nan

    def reset(self) -> None:
        self.resets += 1

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        return torch.full((max(1, wave.shape[-1] // CHUNK_SAMPLES), 8, 64), float("nan") if self.encode_nan else 0.0)

    def decode_next(self, chunk: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.level is not None:  # a steady tone: what gain tests measure
            wave = self.level * torch.sin(torch.arange(CHUNK_SAMPLES) * 0.05).expand(2, -1).clone()
        else:
            wave = 0.5 * torch.tanh(chunk[:, :2]).repeat_interleave(CHUNK_SAMPLES // 8, 0).T.contiguous()  # (2, 32768)
        return wave * float("nan") if self.calls - 1 in self.nan_at else wave


class Flaky(LiveGenerator):
    """A generator whose n-th draft (counting every try) comes out NaN or raises, as `plan` says."""

    def __init__(self, plan: dict, **kw):
        super().__init__(tiny_model(), STATS, SampleConfig(solver="euler", nfe=1, seed=0), "cpu")
        self.plan, self.calls = plan, 0

    def draft(self):
        what = self.plan.get(self.calls, self.plan.get("default"))
        self.calls += 1
        if what == "raise":
            raise RuntimeError("boom")
        x0 = super().draft()
        return x0 * float("nan") if what == "nan" else x0


class Recorder:
    def __init__(self):
        self.chunks: list[np.ndarray] = []

    def write(self, wave: np.ndarray) -> None:
        self.chunks.append(wave.copy())


def engine_with(gen=None, codec=None, controls: Controls | None = None, presets=None, recorder=None,
                max_chunks: int | None = 6, **cfg) -> Engine:
    gen = gen or LiveGenerator(tiny_model(), STATS, SampleConfig(solver="euler", nfe=1, seed=0), "cpu")
    c = controls or replace(BASE, solver="euler", nfe=1)
    return Engine(gen, codec or LatentCodec(), NullSink(), EngineConfig(max_chunks=max_chunks, **cfg), c,
                  recorder=recorder, presets=presets, info={"checkpoint": "test"})


def run_collect(engine: Engine) -> list[dict]:
    events: list[dict] = []
    engine.subscribe(events.append)
    engine.run()
    return events


def chunk_states(events) -> list[dict]:
    return [e["state"] for e in events if e["event"] == "chunk"]


def lfo(**kw) -> dict:
    return {"lfo": {"id": "w", **kw}}


# ---------------------------------------------------------------------------------------------- LFOs

def _series(c: Controls, field: str, n: int, index: int | None = None) -> list:
    out = [getattr(modulate(c, k, W), field) for k in range(n)]
    return out if index is None else [v[index] for v in out]


def test_lfo_shapes_are_exact_functions_of_the_chunk_index():
    c = apply_message(BASE, lfo(target="temperature", shape="square", rate=4, depth=0.5), LIM).controls
    assert _series(c, "temperature", 8) == [1.5, 1.5, 0.5, 0.5] * 2 and c.temperature == 1.0  # the set value stays
    c = apply_message(replace(BASE, cfg_scale=2.0), lfo(target="cfg_scale", shape="triangle", rate=4, depth=1.0),
                      LIM).controls
    assert _series(c, "cfg_scale", 5) == [2.0, 3.0, 2.0, 1.0, 2.0]
    c = apply_message(BASE, lfo(target="token_bias", index=3, shape="sine", rate=4, depth=0.5), LIM).controls
    assert _series(c, "token_bias", 4, 3) == [0.0, 0.5, 0.0, -0.5] and _series(c, "token_bias", 4, 2) == [0.0] * 4
    secs = apply_message(BASE, lfo(target="temperature", shape="sine", rate=8 * CHUNK_SECONDS, unit="seconds",
                                   depth=0.5), LIM).controls
    chunks = apply_message(BASE, lfo(target="temperature", shape="sine", rate=8, depth=0.5), LIM).controls
    np.testing.assert_allclose(_series(secs, "temperature", 16), _series(chunks, "temperature", 16), atol=1e-6)
    half = apply_message(BASE, lfo(target="temperature", shape="square", rate=4, depth=0.5, phase=0.5), LIM).controls
    assert _series(half, "temperature", 4) == [0.5, 0.5, 1.5, 1.5]


def test_random_hold_holds_per_cycle_and_repeats_for_the_same_seed():
    c = apply_message(BASE, lfo(target="channel_scale", shape="random-hold", rate=4, depth=0.5, seed=3), LIM).controls
    v = _series(c, "channel_scale", 12, 7)
    assert v[0:4] == [v[0]] * 4 and v[4:8] == [v[4]] * 4 and len({v[0], v[4], v[8]}) == 3
    assert all(0.5 <= x <= 1.5 for x in v) and v == _series(c, "channel_scale", 12, 7)
    assert _series(c, "channel_scale", 4, 0) == _series(c, "channel_scale", 4, 63)  # no index: every element alike
    other = apply_message(c, lfo(seed=4), LIM).controls
    assert _series(other, "channel_scale", 12, 7) != v


def test_lfos_add_up_clamp_to_the_range_and_switch_off():
    c = apply_message(replace(BASE, temperature=3.8), {"lfo": [
        {"id": "a", "target": "temperature", "shape": "square", "rate": 2, "depth": 0.3},
        {"id": "b", "target": "temperature", "shape": "square", "rate": 2, "depth": 0.2, "phase": 0.5}]}, LIM).controls
    assert _series(c, "temperature", 2) == [3.9, 3.7]  # +0.3 - 0.2, then -0.3 + 0.2
    c = apply_message(c, lfo(id="b", depth=-0.2), LIM).controls  # an update keeps the other fields
    assert _series(c, "temperature", 2) == [4.0, 3.3] and c.lfos[1].phase == 0.5  # 4.3 clamps to 4
    c = apply_message(c, {"lfo": {"id": "a", "on": False}}, LIM).controls
    assert _series(c, "temperature", 2) == [4.0, 3.6]
    ctx = apply_message(replace(BASE, context_chunks=3), lfo(target="context_chunks", shape="square", rate=2,
                                                              depth=2), LIM).controls
    assert _series(ctx, "context_chunks", 2) == [W, 1]  # integers stay integers, within 1..W
    c = apply_message(c, {"lfo": {"id": "a", "remove": True}}, LIM).controls
    assert [x.id for x in c.lfos] == ["b"] and apply_message(c, {"reset": "lfos"}, LIM).controls.lfos == ()


@pytest.mark.parametrize("spec, needle", [
    ({"id": "w", "target": "seed", "depth": 1}, "lfo target must be one of"),
    ({"id": "w", "target": "temperature"}, "needs a target and a depth"),
    ({"id": "w", "target": "temperature", "depth": 0.1, "rate": 1}, "length of one cycle"),
    ({"id": "w", "target": "temperature", "depth": 0.1, "rate": 0.5, "unit": "seconds"}, "length of one cycle"),
    ({"id": "w", "target": "temperature", "depth": 5}, "depth for temperature must lie in"),
    ({"id": "w", "target": "temperature", "depth": 0.1, "index": 2}, "index applies to"),
    ({"id": "w", "target": "channel_bias", "depth": 0.1, "index": 64}, "0..63"),
    ({"id": "w", "target": "temperature", "depth": 0.1, "shape": "saw"}, "lfo shape must be one of"),
    ({"id": "w", "target": "temperature", "depth": 0.1, "unit": "bars"}, "lfo unit must be one of"),
    ({"id": "w", "target": "temperature", "depth": 0.1, "on": 1}, "true or false"),
    ({"id": "w", "target": "temperature", "depth": 0.1, "speed": 1}, "unknown field 'speed'"),
    ({"id": "../x", "target": "temperature", "depth": 0.1}, "lfo id must be"),
    ({"id": "w", "remove": True}, "no LFO 'w' to remove"),
    ({"id": "w", "target": "temperature", "depth": float("nan")}, "finite number"),
    ("wobble", "lfo takes"),
])
def test_bad_lfos_are_refused_and_change_nothing(spec, needle):
    with pytest.raises(ControlError) as err:
        apply_message(BASE, {"lfo": spec, "temperature": 0.5}, LIM)
    assert needle in str(err.value)


def test_at_most_sixteen_lfos():
    many = [{"id": f"l{i}", "target": "token_bias", "index": i % 8, "depth": 0.1} for i in range(16)]
    c = apply_message(BASE, {"lfo": many}, LIM).controls
    with pytest.raises(ControlError, match="at most 16"):
        apply_message(c, lfo(target="temperature", depth=0.1), LIM)


def test_lfo_modulates_each_chunk_through_the_engine_and_state_reports_both():
    engine = engine_with(max_chunks=6)
    engine.submit(lfo(target="temperature", shape="square", rate=2, depth=0.25))
    states = chunk_states(run_collect(engine))
    assert [s["effective"]["temperature"] for s in states] == [1.25, 0.75] * 3
    assert {s["temperature"] for s in states} == {1.0} and engine.gen.cfg.temperature == 0.75
    state = handle_line(engine, '{"get": "state"}')[1]["state"]
    assert state["temperature"] == 1.0 and state["effective"]["temperature"] == 1.25 and state["next_chunk"] == 6
    assert state["lfos"][0] == {"id": "w", "target": "temperature", "index": None, "shape": "square", "rate": 2.0,
                                "unit": "chunks", "depth": 0.25, "phase": 0.0, "on": True, "seed": 0}


# ---------------------------------------------------------------------------------------------- morphs

def test_a_morph_glides_from_what_sounds_now_and_can_be_retargeted_midway():
    c = apply_message(BASE, {"set": {"temperature": 2.0, "token_bias": 1.0}, "morph_chunks": 4}, LIM, now=10).controls
    assert c.temperature == 2.0 and c.morph.start == 10  # the set value is the target at once
    assert _series(c, "temperature", 14)[9:] == [1.0, 1.25, 1.5, 1.75, 2.0]
    assert [modulate(c, k, W).token_bias[0] for k in (10, 13)] == [0.25, 1.0]
    c2 = apply_message(c, {"set": {"temperature": 0.0}, "morph_chunks": 2}, LIM, now=12).controls  # chunk 11 had 1.5
    assert [modulate(c2, k, W).temperature for k in (12, 13, 14)] == [0.75, 0.0, 0.0]
    assert [modulate(c2, k, W).token_bias[0] for k in (12, 13)] == [0.75, 1.0]  # the other glide goes on, restarted
    c3 = apply_message(c, {"cfg_scale": 3.0}, LIM, now=12).controls  # a plain set jumps; the glide goes on
    assert modulate(c3, 12, W).cfg_scale == 3.0 and modulate(c3, 12, W).temperature == 1.75
    c4 = apply_message(c, {"temperature": 0.5}, LIM, now=12).controls  # setting a gliding value stops its glide
    assert modulate(c4, 12, W).temperature == 0.5 and modulate(c4, 12, W).token_bias[0] == 0.75


def test_engine_clears_a_finished_morph():
    engine = engine_with(max_chunks=6)
    engine.submit({"set": {"temperature": 2.0}, "morph_chunks": 3})
    states = chunk_states(run_collect(engine))
    assert [s["effective"]["temperature"] for s in states] == [1.333333, 1.666667, 2.0, 2.0, 2.0, 2.0]
    assert states[0]["morph"] == {"start": 0, "chunks": 3, "fields": ["temperature"]} and states[3]["morph"] is None


# ---------------------------------------------------------------------------------------------- presets

def test_presets_save_recall_morph_and_delete(tmp_path):
    store = PresetStore(tmp_path / "p")
    engine = engine_with(presets=store)
    engine.submit({"set": {"temperature": 0.5, "gain": 0.7, "auto_cycle": 16}, "channel_bias": {"index": 3,
                                                                                                "value": 0.4}})
    engine.submit(lfo(target="cfg_scale", depth=0.5))
    assert handle_line(engine, '{"preset": {"save": "verse 1"}}') == [{"event": "ok"}]
    saved = json.loads((tmp_path / "p" / "verse 1.json").read_text())
    assert saved["format"] == 1 and saved["controls"]["temperature"] == 0.5 and saved["controls"]["lfos"][0]["id"] == "w"
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["verse 1.json"]  # no temporary left behind
    kept = engine.pending
    engine.submit({"reset": "all"})
    assert engine.pending.temperature == 1.0 and engine.pending.lfos == ()
    engine.submit({"preset": {"recall": "verse 1"}})
    assert engine.pending.preset_json() == kept.preset_json()
    engine.submit({"reset": "all"})
    engine.submit({"preset": {"recall": "verse 1", "morph_chunks": 4}})
    c = engine.pending
    assert c.temperature == 0.5 and [modulate(c, k, W).temperature for k in range(4)] == [0.875, 0.75, 0.625, 0.5]
    assert [modulate(c, k, W).gain for k in (0, 3)] == [0.925, 0.7]
    assert handle_line(engine, '{"get": "state"}')[1]["state"]["presets"] == ["verse 1"]
    help_ = handle_line(engine, '{"help": true}')[1]
    assert help_["reference"]["presets"] == ["verse 1"] and "preset" in help_["commands"]
    engine.submit({"preset": {"delete": "verse 1"}})
    assert store.names() == [] and not (tmp_path / "p" / "verse 1.json").exists()


@pytest.mark.parametrize("preset, needle", [
    ({"recall": "nope"}, "no preset named 'nope'; saved: a"),
    ({"save": "../etc/passwd"}, "a preset name is"),
    ({"save": ".hidden"}, "a preset name is"),
    ({"save": ""}, "a preset name is"),
    ({"save": "x" * 65}, "a preset name is"),
    ({"save": 3}, "a preset name is"),
    ({"save": "a", "recall": "a"}, "preset takes"),
    ({"save": "a", "morph_chunks": 3}, "goes with a preset recall"),
    ({"recall": "a", "morph_chunks": -1}, "morph_chunks must be an integer"),
    ({"delete": "nope"}, "no preset named 'nope'"),
])
def test_bad_preset_commands_are_refused(tmp_path, preset, needle):
    store = PresetStore(tmp_path)
    store.save("a", BASE.preset_json())
    with pytest.raises(ControlError) as err:
        apply_message(BASE, {"preset": preset}, Limits(W, presets=store))
    assert needle in str(err.value)


def test_a_hand_edited_preset_is_checked_like_a_command(tmp_path):
    store = PresetStore(tmp_path)
    bad = {**BASE.preset_json(), "temperature": 99}
    (tmp_path / "hot.json").write_text(json.dumps({"format": 1, "name": "hot", "controls": bad}))
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "wide.json").write_text(json.dumps({"format": 1, "controls": {"context_chunks": 99}}))
    lim = Limits(W, presets=store)
    with pytest.raises(ControlError, match="preset 'hot': temperature must lie in"):
        apply_message(BASE, {"preset": {"recall": "hot"}}, lim)
    with pytest.raises(ControlError, match="junk.json: not a readable preset"):
        apply_message(BASE, {"preset": {"recall": "junk"}}, lim)
    assert apply_message(BASE, {"preset": {"recall": "wide"}}, lim).controls.context_chunks == W  # clamped to W
    with pytest.raises(ControlError, match="presets are off"):
        apply_message(BASE, {"preset": {"recall": "wide"}}, LIM)


def test_a_preset_that_cannot_be_written_changes_nothing(tmp_path):
    (tmp_path / "file").write_text("")
    engine = engine_with(presets=PresetStore(tmp_path / "file" / "presets"))
    replies = handle_line(engine, '{"preset": {"save": "a"}, "temperature": 0.5}')
    assert replies[0]["event"] == "error" and "cannot save preset 'a'" in replies[0]["message"]
    assert engine.pending.temperature == 1.0


def test_default_preset_folder_is_the_users_config(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert default_dir() == tmp_path / "codicodec-flow" / "presets" and PresetStore().folder == default_dir()


# ---------------------------------------------------------------------------------------------- randomise, seeds

def test_randomise_steering_with_a_spread():
    msg = {"randomise": {"what": "tokens", "spread": 0.5, "seed": 7}}
    c = apply_message(BASE, msg, LIM).controls
    assert c == apply_message(BASE, msg, LIM).controls  # a seed makes it repeatable
    assert c.channel_scale == BASE.channel_scale and c.channel_bias == BASE.channel_bias
    assert all(0.5 <= v <= 1.5 for v in c.token_scale) and all(-0.5 <= v <= 0.5 for v in c.token_bias)
    assert len(set(c.token_scale)) == 8
    both = apply_message(BASE, {"randomise": {"what": "both", "spread": 2.0}}, LIM).controls
    assert both.channel_scale != BASE.channel_scale and both.token_bias != BASE.token_bias
    glide = apply_message(BASE, {"randomise": {"what": "channels", "spread": 1, "seed": 1, "morph_chunks": 2}},
                          LIM).controls
    assert glide.morph.chunks == 2 and modulate(glide, 0, W).channel_bias[0] == round(glide.channel_bias[0] / 2, 6)
    for bad, needle in (({"what": "notes"}, "what must be one of"), ({"spread": 0}, "spread must be"),
                        ({"spread": 9}, "spread must be"), ({"wild": 1}, "randomise takes")):
        with pytest.raises(ControlError, match=needle):
            apply_message(BASE, {"randomise": bad}, LIM)


def test_auto_cycle_changes_the_seed_every_n_chunks_with_a_crossfade():
    engine = engine_with(controls=replace(BASE, solver="euler", nfe=1, auto_cycle=3, crossfade_chunks=2), max_chunks=8)
    events = run_collect(engine)
    s3 = derived_seed(0, 3)
    s6 = derived_seed(s3, 6)
    states = chunk_states(events)
    assert [s["seed"] for s in states] == [0, 0, 0, s3, s3, s3, s6, s6]
    assert [s["crossfade"] for s in states][2:6] == [None, [1, 2], [2, 2], None]
    assert [(e["index"], e["seed"]) for e in events if e["event"] == "seed"] == [(3, s3), (6, s6)]
    assert apply_message(BASE, {"auto_cycle": 0}, LIM).controls.auto_cycle == 0
    with pytest.raises(ControlError, match="auto_cycle must be an integer"):
        apply_message(BASE, {"auto_cycle": 2.5}, LIM)


def test_crossfade_length_changes_live():
    engine = engine_with(max_chunks=5)
    engine.subscribe(lambda ev: ev.get("index") == 0 and engine.submit({"crossfade_chunks": 2, "seed": 5}))
    states = chunk_states(run_collect(engine))
    assert [s["crossfade"] for s in states] == [None, [1, 2], [2, 2], None, None]
    with pytest.raises(ControlError, match="crossfade_chunks must lie in"):
        apply_message(BASE, {"crossfade_chunks": 0}, LIM)


# ---------------------------------------------------------------------------------------------- gain

def test_gain_scales_ramps_and_never_passes_full_scale():
    rec = Recorder()
    engine = engine_with(codec=LatentCodec(level=0.3), recorder=rec, max_chunks=5)
    engine.subscribe(lambda ev: ev.get("index") == 1 and engine.submit({"gain": 0.5}))
    engine.run()
    tone = LatentCodec(level=0.3).decode_next(torch.zeros(8, 64)).numpy()
    np.testing.assert_allclose(rec.chunks[1], tone, atol=1e-7)
    ramp = rec.chunks[2] / np.where(tone == 0, 1, tone)
    assert abs(ramp[0, 1] - 1.0) < 1e-3 and abs(ramp[0, -1] - 0.5) < 1e-3  # chunk 2 ramps 1 -> 0.5: no click
    np.testing.assert_allclose(rec.chunks[3], 0.5 * tone, atol=1e-7)
    loud = Recorder()
    engine = engine_with(codec=LatentCodec(level=0.8), recorder=loud, max_chunks=3,
                         controls=replace(BASE, solver="euler", nfe=1, gain=2.0))
    engine.run()
    assert max(np.abs(w).max() for w in loud.chunks) <= LIMIT + 1e-6  # lifted only up to the limiter's ceiling
    assert abs(np.abs(loud.chunks[-1]).max() - LIMIT) < 1e-3
    with pytest.raises(ControlError, match=r"gain must lie in \[0.0, 2.0\]"):
        apply_message(BASE, {"gain": 2.5}, LIM)


# ---------------------------------------------------------------------------------------------- display events

def test_ready_event_comes_first_and_info_repeats_it():
    events = run_collect(engine_with(max_chunks=2))
    ready = events[0]
    assert ready["event"] == "ready" and ready["window"] == W and ready["codec"] == "latent-hold"
    assert ready["sample_rate"] == 48_000 and ready["chunk_samples"] == CHUNK_SAMPLES and ready["latent_dim"] == 64
    assert ready["model"]["dim"] == CFG.dim and ready["checkpoint"] == "test" and ready["max_gain"] == 2.0
    engine = engine_with()
    assert handle_line(engine, '{"get": "info"}')[1] == ready


def test_waveform_and_latent_events_are_opt_in_and_rate_limited():
    rec = Recorder()
    quiet = run_collect(engine_with(max_chunks=3))
    assert not [e for e in quiet if e["event"] in ("waveform", "latents")]
    engine = engine_with(recorder=rec, max_chunks=3, controls=replace(
        BASE, solver="euler", nfe=1, events=EventOptions(waveform=True, latents=True, max_rate_hz=1.0)))
    ticks = iter(range(100))
    engine.clock = lambda: float(next(ticks))  # one second between looks at the clock: every chunk may send
    events = run_collect(engine)
    waves = [e for e in events if e["event"] == "waveform"]
    grids = [e for e in events if e["event"] == "latents"]
    assert [e["index"] for e in waves] == [0, 1, 2] and [e["index"] for e in grids] == [0, 1, 2]
    w = waves[1]
    assert np.shape(w["min"]) == np.shape(w["max"]) == (2, 128) and np.shape(grids[1]["grid"]) == (8, 64)
    audio = rec.chunks[1]
    assert abs(w["max"][0][0] - audio[0, :256].max()) < 1e-4 and abs(w["peak"][1] - np.abs(audio[1]).max()) < 1e-4
    slow = engine_with(max_chunks=4)
    slow.submit({"events": {"waveform": True, "max_rate_hz": 0.1}})
    assert len([e for e in run_collect(slow) if e["event"] == "waveform"]) == 1  # one per 10 s at most
    with pytest.raises(ControlError, match="max_rate_hz must lie in"):
        apply_message(BASE, {"events": {"max_rate_hz": 0}}, LIM)


# ---------------------------------------------------------------------------------------------- recovery

def test_a_nan_chunk_is_drawn_again_and_never_reaches_the_speakers():
    rec = Recorder()
    gen = Flaky({2: "nan"})
    events = run_collect(engine_with(gen=gen, recorder=rec, max_chunks=5))
    rescued = [e for e in events if e["event"] == "recovered"]
    assert rescued == [{"event": "recovered", "index": 2, "outcome": "regenerated", "retries": 1,
                        "reasons": ["non-finite latents"]}]
    assert gen.calls == 6 and gen.chunks_done == 5 and all(np.isfinite(w).all() for w in rec.chunks)
    assert gen.cache.n == min(5, W)  # every chunk but the dropped draft became context


def test_a_chunk_that_keeps_failing_is_silence_and_the_stream_goes_on(caplog):
    rec = Recorder()
    gen = Flaky({1: "nan", 2: "raise", 3: "nan"})
    events = run_collect(engine_with(gen=gen, recorder=rec, max_chunks=4, retries=2))
    rescued = [e for e in events if e["event"] == "recovered"]
    assert [(e["index"], e["outcome"], e["retries"]) for e in rescued] == [(1, "silence", 2)]
    assert rescued[0]["reasons"] == ["non-finite latents", "RuntimeError: boom", "non-finite latents"]
    assert "chunk 1: RuntimeError: boom; drawing it again" in caplog.text  # logged, one line, no traceback
    silent, after = rec.chunks[1], rec.chunks[2]
    assert not silent[:, FADE:].any() and np.allclose(silent[:, 0], rec.chunks[0][:, -1], atol=1e-6)  # faded out
    assert np.all(after[:, 0] == 0) and after[:, FADE:].any()  # and the next chunk fades in
    assert len(rec.chunks) == 4 and [e["index"] for e in events if e["event"] == "chunk"] == [0, 1, 2, 3]


def test_non_finite_audio_resets_the_decoder_and_is_drawn_again():
    codec = LatentCodec(nan_at=(1,))
    rec = Recorder()
    events = run_collect(engine_with(codec=codec, recorder=rec, max_chunks=3))
    assert [e["reasons"] for e in events if e["event"] == "recovered"] == [["non-finite audio"]]
    assert codec.resets == 2 and all(np.isfinite(w).all() for w in rec.chunks)  # one at the start, one after NaN


def test_an_input_that_encodes_to_nan_is_left_out_of_the_context(tmp_path):
    source = WavInput(write_audio(tmp_path / "band.wav", 2 * CHUNK_SECONDS + 0.1), paced=False)
    gen = Flaky({})
    engine = Engine(gen, LatentCodec(encode_nan=True), NullSink(), EngineConfig(), replace(BASE, solver="euler", nfe=1),
                    source=source)
    events = run_collect(engine)
    rescued = [e for e in events if e["event"] == "recovered"]
    assert [(e["index"], e["outcome"], e["retries"]) for e in rescued] == [(0, "input_left_out", 0),
                                                                          (1, "input_left_out", 0)]
    assert gen.cache.n == 0 and engine.chunks == 2  # nothing bad became context; the chunks still played


def test_persistent_failure_ends_the_session_with_a_clear_error():
    engine = engine_with(gen=Flaky({"default": "raise"}), max_chunks=50, retries=1, max_failed_chunks=3)
    events: list[dict] = []
    engine.subscribe(events.append)
    with pytest.raises(RealtimeError, match="generation failed 3 chunks in a row, each tried 2 times"):
        engine.run()
    assert [e["outcome"] for e in events if e["event"] == "recovered"] == ["silence", "silence"]


# ---------------------------------------------------------------------------------------------- front ends

@pytest.mark.parametrize("address, args, command", [
    ("/cf/gain", [0.8], {"set": {"gain": 0.8}}),
    ("/cf/auto_cycle", [32.0], {"set": {"auto_cycle": 32}}),
    ("/cf/crossfade_chunks", [4.0], {"set": {"crossfade_chunks": 4}}),
    ("/cf/lfo/wob", ["target", "temperature", "shape", "sine", "rate", 8.0, "depth", 0.3],
     {"lfo": {"id": "wob", "target": "temperature", "shape": "sine", "rate": 8.0, "depth": 0.3}}),
    ("/cf/lfo/wob/depth", [0.25], {"lfo": {"id": "wob", "depth": 0.25}}),
    ("/cf/lfo/wob/on", [0.0], {"lfo": {"id": "wob", "on": False}}),
    ("/cf/lfo/wob/index", [3.0], {"lfo": {"id": "wob", "index": 3}}),
    ("/cf/lfo/wob/remove", [], {"lfo": {"id": "wob", "remove": True}}),
    ("/cf/preset/save", ["verse"], {"preset": {"save": "verse"}}),
    ("/cf/preset/recall", ["verse", 16.0], {"preset": {"recall": "verse", "morph_chunks": 16}}),
    ("/cf/preset/delete", ["verse"], {"preset": {"delete": "verse"}}),
    ("/cf/randomise", ["tokens", 0.5], {"randomise": {"what": "tokens", "spread": 0.5}}),
    ("/cf/events/waveform", [1], {"events": {"waveform": True}}),
    ("/cf/events/max_rate_hz", [5.0], {"events": {"max_rate_hz": 5.0}}),
    ("/cf/reset", ["lfos"], {"reset": "lfos"}),
    ("/cf/get", ["info"], {"get": "info"}),
])
def test_osc_addresses_for_the_live_rig(address, args, command):
    assert osc_command(address, args) == command


@pytest.mark.parametrize("address, args, needle", [
    ("/cf/lfo", [], "use /cf/lfo/ID"),
    ("/cf/lfo/wob", ["depth"], "FIELD VALUE pairs"),
    ("/cf/lfo/wob", ["speed", 3], "unknown LFO field 'speed'"),
    ("/cf/randomise", [], "takes tokens, channels or both"),
    ("/cf/lfos", [1], "unknown OSC address"),
])
def test_bad_osc_live_rig_addresses(address, args, needle):
    with pytest.raises(ControlError, match=needle):
        osc_command(address, args)


def test_osc_carries_the_new_events():
    assert event_messages({"event": "seed", "index": 3, "seed": 9, "reason": "auto_cycle"}) == [("/cf/cycled", [3, 9])]
    assert event_messages({"event": "recovered", "index": 2, "outcome": "silence", "retries": 2, "reasons": []}) == \
        [("/cf/recovered", [2, "silence", 2])]
    wave = event_messages({"event": "waveform", "index": 1, "min": [[-0.5, 0.0], [-0.1, -0.3]],
                           "max": [[0.2, 0.1], [0.4, 0.0]]})
    assert wave == [("/cf/waveform", [1, 0.5, 0.3])]
    (address, args), = event_messages({"event": "ready", "window": 4})
    assert address == "/cf/ready" and json.loads(args[0]) == {"window": 4}


def test_keys_for_the_live_rig(tmp_path):
    store = PresetStore(tmp_path)
    engine = engine_with(presets=store)
    notes: list[str] = []
    keys = KeyControls(engine, notes.append, lambda: None)
    assert keys.command("x") == {"randomise": {"what": "tokens", "spread": 0.5}}
    keys.press("k")
    assert keys.command("x") == {"randomise": {"what": "channels", "spread": 0.5}}
    assert keys.command("X")["randomise"]["what"] == "both"
    keys.press("a")
    assert engine.pending.auto_cycle == 32 and keys.command("a") == {"auto_cycle": 0}
    keys.press("V")
    assert engine.pending.gain == 1.1 and notes[-1] == "gain 1.1"
    keys.press("C")
    assert engine.pending.crossfade_chunks == 5
    keys.press("p")
    assert notes[-1].startswith("no presets saved yet")
    keys.press("W")
    keys.press("W")
    assert store.names() == ["key-1", "key-2"] and notes[-1] == "saved preset key-2"
    keys.press("p")
    assert notes[-1] == "preset key-1 (morphing over 8 chunks)" and keys.command("p")["preset"]["recall"] == "key-2"
    keys.press("o")
    assert notes[-1].startswith("no LFOs")
    engine.submit(lfo(target="temperature", depth=0.1))
    keys.press("o")
    assert engine.pending.lfos[0].on is False and notes[-1] == "LFOs w:off"


def test_help_describes_every_control_for_generated_front_ends():
    engine = engine_with()
    ref = handle_line(engine, '{"help": true}')[1]["reference"]
    assert ref["controls"]["gain"] == {"start": 1.0, "type": "number", "range": [0.0, 2.0], "modulatable": True}
    assert ref["controls"]["context_chunks"]["range"] == [1, W] and ref["controls"]["solver"]["type"] == "choice"
    assert ref["controls"]["channel_bias"]["length"] == 64 and ref["presets"] is None
    assert ref["lfo"]["shapes"] == ["sine", "triangle", "square", "random-hold"] and "gain" in ref["lfo"]["targets"]
    assert "temperature" in ref["lfo"]["targets"] and "seed" not in ref["lfo"]["targets"]


# ---------------------------------------------------------------------------------------------- raw weights

@pytest.fixture(scope="module")
def last_pt(tmp_path_factory):
    ema = tiny_model().state_dict()
    raw = {k: v + 1.0 for k, v in ema.items()}
    path = tmp_path_factory.mktemp("run") / "last.pt"
    save_checkpoint({"kind": "training", "model": raw, "ema": ema, "step": 5,
                     "config": {"model": asdict(CFG), "flow": asdict(FlowConfig()), "train": {}},
                     "stats": STATS.to_json(), "codec": {"name": "spectral", "version": "1"}}, path)
    return path


def test_raw_weights_load_from_last_pt_and_ema_pt_refuses(last_pt, ckpt):
    key = next(iter(tiny_model().state_dict()))
    raw = load_bundle(last_pt, weights="raw")
    assert raw.weights == "raw" and torch.equal(raw.model.state_dict()[key], tiny_model().state_dict()[key] + 1.0)
    assert torch.equal(load_bundle(last_pt).model.state_dict()[key], tiny_model().state_dict()[key])
    with pytest.raises(CheckpointError, match="holds only the EMA weights .* last.pt"):
        load_weights(ckpt, "raw")
    with pytest.raises(CheckpointError, match="unknown weights"):
        load_weights(last_pt, "best")


def test_realtime_with_raw_weights_and_a_start_preset(last_pt, ckpt, tmp_path, capsys):
    store = PresetStore(tmp_path)
    store.save("calm", {**Controls(context_chunks=W).preset_json(), "temperature": 0.6, "gain": 0.5})
    res = run_realtime(RealtimeConfig(ckpt=str(last_pt), device="cpu", sink="null", weights="raw", presets=str(tmp_path),
                                      preset="calm", engine=EngineConfig(max_chunks=2), keyboard=False, plain=True))
    out = capsys.readouterr().out
    assert res.summary.chunks == 2 and "temp 0.60" in out
    assert _cli(["realtime", "--ckpt", str(ckpt), "--weights", "raw", "--sink", "null", "--max-chunks", "1"]) == 2
    err = capsys.readouterr().err
    assert "holds only the EMA weights" in err and "Traceback" not in err
    assert _cli(["realtime", "--ckpt", str(ckpt), "--presets", str(tmp_path), "--preset", "loud", "--sink", "null",
                 "--max-chunks", "1", "--device", "cpu"]) == 2
    assert "no preset named 'loud'; saved: calm" in capsys.readouterr().err


def test_sample_with_raw_weights(last_pt, ckpt, tmp_path, capsys):
    out = tmp_path / "raw.wav"
    common = ["--out", str(out), "--duration-s", "1", "--device", "cpu", "--solver", "euler", "--nfe", "1"]
    assert _cli(["sample", "--ckpt", str(last_pt), "--weights", "raw", *common]) == 0 and out.exists()
    assert torch.load(out.with_suffix(".latents.pt"), weights_only=True)["meta"]["weights"] == "raw"
    assert _cli(["sample", "--ckpt", str(ckpt), "--weights", "raw", *common]) == 2
    assert "holds only the EMA weights" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- a long session

def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc")
def test_long_headless_session_with_lfos_a_morph_and_auto_cycling_stays_flat(tmp_path):
    n = 200
    store = PresetStore(tmp_path)
    store.save("bright", {**replace(BASE, solver="euler", nfe=1, auto_cycle=40).preset_json(), "temperature": 0.7,
                          "channel_scale": [1.5] * 64})
    start = apply_message(replace(BASE, solver="euler", nfe=1, auto_cycle=20), {"lfo": [
        {"id": "t", "target": "temperature", "shape": "sine", "rate": 16, "depth": 0.3},
        {"id": "b", "target": "channel_bias", "index": 5, "shape": "triangle", "rate": 12, "depth": 0.5},
        {"id": "g", "target": "gain", "shape": "random-hold", "rate": 8, "depth": 0.2}]}, LIM).controls
    engine = engine_with(controls=start, presets=store, max_chunks=n)
    engine.stats = deque(maxlen=16)  # the summary's window is bounded by design (8192); keep it out of the measure
    temps = np.zeros(n)
    finite = np.zeros(n, bool)
    marks: dict[int, tuple[int, int]] = {}
    seeds: set[int] = set()

    def watch(ev):
        if ev["event"] == "seed":
            seeds.add(ev["seed"])
        if ev["event"] != "chunk":
            return
        k = ev["index"]
        temps[k] = ev["state"]["effective"]["temperature"]
        finite[k] = np.isfinite(engine._last_wave.numpy()).all()
        if k == 60:
            engine.submit({"preset": {"recall": "bright", "morph_chunks": 20}})
        if k == 90:
            tracemalloc.start()  # from here: the chunks before it ran at full speed
        if k in (100, n - 1):
            marks[k] = (tracemalloc.get_traced_memory()[0], _rss_bytes())
    engine.subscribe(watch)
    try:
        summary = engine.run()
    finally:
        tracemalloc.stop()
    assert summary.chunks == n and summary.underruns == 0 and finite.all()
    np.testing.assert_allclose(temps[:61], 1.0 + 0.3 * np.sin(2 * np.pi * np.arange(61) / 16), atol=1e-6)
    assert 0.7 < temps[70] < temps[61] and np.all(temps[80:] == 0.7)  # the morph glides; the preset has no LFOs
    assert len(seeds) == 6  # every 20 chunks (20, 40, 60), then the preset's every 40 (80, 120, 160)
    # Nothing may be kept per chunk: a chunk's audio is 256 KiB, its latents 2 KiB, its events a few KiB. CPython's
    # own free lists do fill up slowly at first (~0.3 KiB a chunk here, flat after ~2,000 chunks: measured the same
    # at 2,000 and 4,000 chunks), so the bound is 1 KiB a chunk, not zero.
    chunks = n - 1 - 100
    py_growth = marks[n - 1][0] - marks[100][0]
    rss_growth = marks[n - 1][1] - marks[100][1]
    assert py_growth < chunks * 1024, f"Python memory grew {py_growth} bytes over {chunks} chunks"
    assert rss_growth < 16 * 2**20, f"resident memory grew {rss_growth / 2**20:.1f} MiB over {chunks} chunks"
