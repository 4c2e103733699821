"""MIDI control: CC and note translation on known answers, map files (checked by the protocol's validator),
learn mode, a live engine fed injected mido messages, the command end to end, and real virtual ports through the
system's MIDI (ALSA's sequencer, or a JACK server on its dummy driver started for the test)."""
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import mido
import pytest

from codicodec_flow.errors import FlowError
from codicodec_flow.realtime import midi
from codicodec_flow.realtime.midi import MidiControl
from codicodec_flow.realtime.midi_map import (DEFAULT_MAP, CCBinding, MidiMap, NoteBinding, cc_value, check_map,
                                              load_map, midi_command, parse_map, parse_target, save_map)
from codicodec_flow.realtime.state import ControlError, Controls, Limits
from test_realtime import W, _cli, ckpt, make_engine  # noqa: F401  (ckpt is a fixture)

ROOT = Path(__file__).resolve().parents[1]


def cc(control: int, value: int, channel: int = 1) -> mido.Message:
    return mido.Message("control_change", channel=channel - 1, control=control, value=value)


def note(n: int, velocity: int = 100, channel: int = 1) -> mido.Message:
    return mido.Message("note_on", channel=channel - 1, note=n, velocity=velocity)


@pytest.mark.parametrize("binding, value, expected", [
    (CCBinding(70, "temperature", 0.0, 2.0), 0, 0.0),
    (CCBinding(70, "temperature", 0.0, 2.0), 127, 2.0),
    (CCBinding(70, "temperature", 0.0, 2.0), 64, 1.0079),  # 64/127 of the way, rounded to 4 places
    (CCBinding(70, "temperature", 2.0, 0.0), 127, 0.0),  # min above max: the knob runs backwards
    (CCBinding(72, "nfe", 1, 16, "exp"), 0, 1),
    (CCBinding(72, "nfe", 1, 16, "exp"), 127, 16),
    (CCBinding(72, "nfe", 1, 16, "exp"), 32, 2),  # 16 ** (32/127) = 2.01: equal turns, equal ratios
    (CCBinding(72, "nfe", 1, 16, "exp"), 64, 4),  # 16 ** (64/127) = 4.05
    (CCBinding(72, "nfe", 1, 16), 64, 9),  # linear: 1 + 15 * 64/127 = 8.56, whole evaluations
    (CCBinding(73, "context_chunks", 1, "window"), 127, W),
    (CCBinding(73, "context_chunks", 1, "window"), 0, 1),
    (CCBinding(75, "token_bias", -1.0, 1.0), 127, 1.0),
])
def test_cc_values_on_known_answers(binding, value, expected):
    got = cc_value(binding, value, W)
    assert got == expected and type(got) is type(expected)


def test_messages_become_protocol_commands():
    c = Controls(context_chunks=W)
    assert midi_command(cc(70, 127), DEFAULT_MAP, c, W) == {"set": {"temperature": 2.0}}
    assert midi_command(cc(70, 0, channel=16), DEFAULT_MAP, c, W) == {"set": {"temperature": 0.0}}  # any channel
    assert midi_command(cc(74, 0), DEFAULT_MAP, c, W) == {"set": {"token_scale": 0.0}}  # every token at once
    c2 = Controls(context_chunks=W, channel_scale=(0.5,) * 64)
    cmd = midi_command(cc(77, 127), DEFAULT_MAP, c2, W)  # channels 32..63 move, 0..31 stay where they were
    assert cmd == {"set": {"channel_scale": [0.5] * 32 + [2.0] * 32}}
    one = MidiMap(cc=(CCBinding(21, "channel_bias", -1.0, 1.0, channel=2, index=12),))
    assert midi_command(cc(21, 127, channel=2), one, c, W) == {"set": {"channel_bias": {"index": 12, "value": 1.0}}}
    assert midi_command(cc(21, 127, channel=1), one, c, W) is None  # bound on channel 2 only
    assert midi_command(note(36), DEFAULT_MAP, c, W) == {"seed": "random"}
    assert midi_command(note(37), DEFAULT_MAP, c, W) == {"reset": "steering"}
    assert midi_command(note(36, velocity=0), DEFAULT_MAP, c, W) is None  # note on at velocity 0 is a release
    assert midi_command(mido.Message("note_off", note=36), DEFAULT_MAP, c, W) is None
    assert midi_command(mido.Message("clock"), DEFAULT_MAP, c, W) is None
    assert midi_command(cc(1, 64), DEFAULT_MAP, c, W) is None  # the mod wheel is left alone


def test_a_channel_binding_wins_over_an_any_channel_one():
    m = MidiMap(cc=(CCBinding(70, "temperature", 0.0, 2.0), CCBinding(70, "cfg_scale", 0.0, 4.0, channel=3)))
    c = Controls(context_chunks=W)
    assert midi_command(cc(70, 127, channel=3), m, c, W) == {"set": {"cfg_scale": 4.0}}
    assert midi_command(cc(70, 127, channel=4), m, c, W) == {"set": {"temperature": 2.0}}


def test_the_default_map_passes_the_protocols_validator_and_the_shipped_file_matches_it():
    check_map(DEFAULT_MAP, Limits(W, Controls(context_chunks=W)), "default")
    shipped = json.loads((ROOT / "patches" / "midi-default.json").read_text())
    assert shipped == DEFAULT_MAP.to_json()
    assert parse_map(shipped, "midi-default.json") == DEFAULT_MAP  # and it reads back to the same map


@pytest.mark.parametrize("data, needle", [
    ([], "a MIDI map is a JSON object"),
    ({"knobs": []}, "a MIDI map is a JSON object"),
    ({"cc": [{"cc": 200, "control": "temperature", "min": 0, "max": 1}]}, "cc[0]: cc must be an integer 0..127"),
    ({"cc": [{"cc": 1, "control": "volume", "min": 0, "max": 1}]}, "MIDI cannot drive 'volume'"),
    ({"cc": [{"cc": 1, "control": "seed", "min": 0, "max": 1}]}, "MIDI cannot drive 'seed'"),
    ({"cc": [{"cc": 1, "control": "temperature", "min": 0}]}, "a knob is"),
    ({"cc": [{"cc": 1, "control": "temperature", "min": 0, "max": 1, "channel": 0}]}, "channel must be 1..16"),
    ({"cc": [{"cc": 1, "control": "temperature", "min": 0, "max": 1, "curve": "log"}]}, "curve must be one of"),
    ({"cc": [{"cc": 1, "control": "temperature", "min": 0, "max": 1, "curve": "exp"}]}, "above 0"),
    ({"cc": [{"cc": 1, "control": "temperature", "min": 0, "max": "window"}]}, "min and max are numbers"),
    ({"cc": [{"cc": 1, "control": "temperature", "min": 0, "max": 1, "index": 2}]}, "only token_scale"),
    ({"cc": [{"cc": 1, "control": "channel_bias", "min": 0, "max": 1, "index": 64}]}, "index must be 0..63"),
    ({"cc": [{"cc": 1, "control": "channel_bias", "min": 0, "max": 1, "index": [9, 3]}]}, "index must be 0..63"),
    ({"cc": [{"cc": 1, "control": "temperature", "min": 0, "max": 1},
             {"cc": 1, "control": "cfg_scale", "min": 0, "max": 1}]}, "cc 1 on any channel is bound twice"),
    ({"notes": [{"note": 36}]}, "notes[0]: a pad is"),
    ({"notes": [{"note": 36, "command": "random"}]}, "a pad is"),
])
def test_malformed_maps_are_refused_naming_the_file_and_entry(data, needle):
    with pytest.raises(FlowError) as err:
        parse_map(data, "my.json")
    assert needle in str(err.value) and str(err.value).startswith("my.json")


@pytest.mark.parametrize("entry, needle", [
    ({"cc": [{"cc": 1, "control": "temperature", "min": 0, "max": 9}]}, "cc 1 (temperature) at 127: temperature must"),
    ({"cc": [{"cc": 1, "control": "context_chunks", "min": 1, "max": 64}]}, f"context_chunks must be an integer 1..{W}"),
    ({"notes": [{"note": 40, "command": {"seed": "lucky"}}]}, "note 40: seed must be"),
])
def test_a_map_the_stream_would_refuse_fails_at_start(entry, needle):
    with pytest.raises(FlowError, match=None) as err:
        check_map(parse_map(entry, "my.json"), Limits(W, Controls(context_chunks=W)), "my.json")
    assert needle in str(err.value)


def test_map_files_load_save_and_default(tmp_path):
    path = tmp_path / "knobs.json"
    assert load_map(path) == DEFAULT_MAP  # not there yet: the built-in map (learn will create the file)
    mine = MidiMap(cc=(CCBinding(21, "channel_bias", -1.0, 1.0, channel=2, index=(8, 15)),),
                   notes=(NoteBinding(60, {"quit": True}, channel=10),))
    save_map(mine, path)
    assert load_map(path) == mine
    assert json.loads(path.read_text())["cc"][0] == {"cc": 21, "channel": 2, "control": "channel_bias",
                                                     "index": [8, 15], "min": -1.0, "max": 1.0, "curve": "linear"}
    path.write_text("{oops")
    with pytest.raises(FlowError, match="knobs.json: not valid JSON"):
        load_map(path)


def test_learn_keeps_a_targets_range_and_frees_the_knob():
    m = DEFAULT_MAP.bind("temperature", 21, 1)
    assert m.knob(21, 1) == CCBinding(21, "temperature", 0.0, 2.0, "linear", 1)  # the range it had on CC 70
    assert m.knob(70, 1) is None  # temperature is driven by one knob only
    m2 = m.bind("channel_bias/5", 21, 1)  # the same knob learned again: its old binding goes
    assert m2.knob(21, 1).target == "channel_bias/5" and m2.knob(21, 1).lo == -1.0
    assert not any(b.control == "temperature" for b in m2.cc)
    assert parse_target("channel_scale/0-31") == ("channel_scale", (0, 31))
    for bad, needle in [("temperature/2", "only token_scale"), ("token_bias/8", "index must be 0..7"),
                        ("solver", "MIDI cannot drive"), ("token_bias/x", "the index is a number")]:
        with pytest.raises(ControlError, match=None) as err:
            parse_target(bad)
        assert needle in str(err.value)


def test_injected_messages_steer_a_live_engine_and_learn_saves_the_map(tmp_path):
    engine = make_engine()
    path = tmp_path / "learned.json"
    feed = [cc(9, 10, channel=2), cc(70, 127), cc(70, 127), cc(72, 64), cc(76, 0), note(37), cc(9, 127, channel=2)]
    ctl = MidiControl(engine, feed, DEFAULT_MAP, path, learn="cfg_scale")
    try:
        assert ctl.wait(10)
        c = engine.pending
        # the first CC (9) is learned for cfg_scale; CC 70 -> temperature 2; nfe 4; channels 0..31 scaled to 0,
        # then reset by pad 37
        assert (c.temperature, c.nfe, c.channel_scale, c.cfg_scale) == (2.0, 4, (1.0,) * 64, 4.0)
        saved = load_map(path)
        assert saved.knob(9, 2) == CCBinding(9, "cfg_scale", 0.0, 4.0, "linear", 2) and saved.knob(71, 1) is None
        assert ctl.learning is None
        engine.submit({"temperature": 0.5})  # another front end moves it; the knob, sending 127 again, takes over
        assert ctl.handle(cc(70, 127)) == {"set": {"temperature": 2.0}} and engine.pending.temperature == 2.0
        assert ctl.handle(mido.Message("clock")) is None
    finally:
        ctl.close()


def test_learn_armed_from_the_protocol(tmp_path):
    engine = make_engine()
    ctl = MidiControl(engine, [], DEFAULT_MAP, tmp_path / "m.json")
    try:
        engine.submit({"midi_learn": "token_bias/3"})
        assert ctl.learning == "token_bias/3"
        with pytest.raises(ControlError, match="MIDI cannot drive 'solver'"):
            engine.submit({"midi_learn": "solver", "temperature": 0.5})
        assert engine.pending.temperature == Controls().temperature  # all or nothing
        ctl.handle(cc(30, 127))
        assert engine.pending.token_bias[3] == 1.0 and load_map(tmp_path / "m.json").knob(30, 1).target == "token_bias/3"
    finally:
        ctl.close()
    with pytest.raises(ControlError, match="--midi"):
        make_engine().submit({"midi_learn": "temperature"})  # no MIDI input: said, not silently ignored


def test_bad_learn_target_and_bad_map_fail_at_start(tmp_path):
    with pytest.raises(FlowError, match="--midi-learn: MIDI cannot drive 'seed'"):
        MidiControl(make_engine(), [], DEFAULT_MAP, learn="seed")
    too_wide = MidiMap(cc=(CCBinding(1, "context_chunks", 1, 64),))
    with pytest.raises(FlowError, match="cc 1 \\(context_chunks\\) at 127"):
        MidiControl(make_engine(), [], too_wide, "mine.json")


class FakePort:
    """Stands in for a mido input port: yields (seconds later, message) pairs, then waits until closed."""
    name = "Fake Controller"

    def __init__(self, timed):
        self.timed, self.closed = timed, threading.Event()

    def __iter__(self):
        for gap, m in self.timed:
            if self.closed.wait(gap):
                return
            yield m
        self.closed.wait()

    def close(self):
        self.closed.set()


def test_command_end_to_end_with_an_injected_port(ckpt, tmp_path, monkeypatch, capsys):  # noqa: F811
    mapping = tmp_path / "rig.json"
    mapping.write_text(json.dumps({"cc": [{"cc": 70, "control": "temperature", "min": 0, "max": 2}],
                                   "notes": [{"note": 60, "command": {"quit": True}}]}))
    port = FakePort([(0.2, cc(5, 64)), (0.2, cc(70, 127)), (2.5, note(60))])  # learned knob, knob, quit pad
    opened = []
    monkeypatch.setattr("codicodec_flow.realtime.session.open_input", lambda spec: opened.append(spec) or port)
    rc = _cli(["realtime", "--ckpt", str(ckpt), "--device", "cpu", "--sink", "null", "--pace", "realtime",
               "--max-chunks", "400", "--no-keys", "--plain", "--midi", "Fake", "--midi-map", str(mapping),
               "--midi-learn", "cfg_scale"])
    out = capsys.readouterr().out
    assert rc == 0 and opened == ["Fake"] and port.closed.is_set()
    assert f"midi: Fake Controller, map {mapping}" in out and "temp 2.00" in out and "cfg 2.02" in out
    assert "chunks 400" not in out  # pad 60 quit long before
    assert load_map(mapping).knob(5, 1).target == "cfg_scale"


@pytest.mark.parametrize("extra, needle", [
    (["--midi-map", "x.json"], "apply with --midi PORT only"),
    (["--midi-learn", "temperature"], "apply with --midi PORT only"),
])
def test_command_midi_errors_are_one_line(ckpt, capsys, extra, needle):  # noqa: F811
    assert _cli(["realtime", "--ckpt", str(ckpt), "--device", "cpu", "--sink", "null", "--max-chunks", "1",
                 *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_command_refuses_a_broken_map_before_loading_the_model(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text('{"cc": [{"cc": 70, "control": "volume", "min": 0, "max": 1}]}')
    monkeypatch.setattr("codicodec_flow.realtime.session.open_input", lambda spec: pytest.fail("opened a port"))
    assert _cli(["realtime", "--ckpt", str(tmp_path / "missing.pt"), "--sink", "null", "--midi", "0",
                 "--midi-map", str(bad)]) == 2
    assert "bad.json: cc[0]: MIDI cannot drive 'volume'" in capsys.readouterr().err


def test_midi_list_needs_no_checkpoint(capsys):
    rc = _cli(["realtime", "--midi", "list"])
    out, err = capsys.readouterr()
    try:
        names = mido.get_input_names()
    except (ImportError, OSError):  # no rtmidi, or no MIDI system (a container without ALSA's sequencer)
        assert rc == 2 and ("no MIDI system" in err or "python-rtmidi" in err) and "Traceback" not in err
        return
    assert rc == 0 and all(n in out for n in names)


@pytest.fixture
def virtual_midi(monkeypatch):
    """A MIDI system with virtual ports: ALSA's sequencer where there is one, else a JACK server on its dummy
    driver (Debian: jackd2), started for this test alone; skipped when neither can be had."""
    try:
        mido.open_output("codicodec-flow probe", virtual=True).close()
        yield "default"
        return
    except (OSError, NotImplementedError) as exc:
        why = f"no virtual MIDI ports ({exc})"
    if shutil.which("jackd") is None:
        pytest.skip(f"{why}, and no jackd to start a JACK server with (Debian: apt-get install jackd2)")
    server = f"cf-test-{os.getpid()}"
    monkeypatch.setenv("JACK_DEFAULT_SERVER", server)
    monkeypatch.setenv("JACK_NO_AUDIO_RESERVATION", "1")
    jackd = subprocess.Popen(["jackd", "-n", server, "-r", "-d", "dummy", "-r", "48000", "-p", "1024"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    previous = mido.backend.name
    mido.set_backend("mido.backends.rtmidi/UNIX_JACK")
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                mido.open_output("codicodec-flow probe", virtual=True).close()
                break
            except OSError as exc:
                if jackd.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"{why}, and a JACK server on the dummy driver did not start ({exc})")
                time.sleep(0.1)
        yield "jack"
    finally:
        mido.set_backend(previous)
        jackd.terminate()
        jackd.wait(10)


def _sender() -> mido.ports.BaseOutput:
    """An output to our virtual input, as a DAW would open it (the system prefixes the client's name)."""
    name = next(n for n in mido.get_output_names() if midi.VIRTUAL_NAME in n and "probe" not in n)
    return mido.open_output(name)


def _until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_real_virtual_port(virtual_midi):
    """Another program plays into `--midi virtual` through the system's MIDI (ALSA, or JACK)."""
    port = midi.open_input("virtual")
    engine = make_engine()
    ctl = MidiControl(engine, port)
    try:
        with _sender() as out:
            out.send(cc(70, 127))
            out.send(note(37))
            out.send(cc(76, 0))
            _until(lambda: engine.pending.channel_scale[0] == 0.0)
        assert engine.pending.temperature == 2.0 and engine.pending.channel_scale == (0.0,) * 32 + (1.0,) * 32
    finally:
        ctl.close()
    assert ctl.wait(2) and port.closed  # closing ends the port's iteration, and with it the reader thread


def test_command_with_a_virtual_port(virtual_midi, ckpt, tmp_path, capsys):  # noqa: F811
    mapping = tmp_path / "rig.json"
    mapping.write_text(json.dumps({"cc": [{"cc": 70, "control": "temperature", "min": 0, "max": 2}],
                                   "notes": [{"note": 60, "command": {"quit": True}}]}))
    argv = ["realtime", "--ckpt", str(ckpt), "--device", "cpu", "--sink", "null", "--pace", "realtime",
            "--max-chunks", "400", "--no-keys", "--plain", "--midi", "virtual", "--midi-map", str(mapping)]
    result, out = {}, []
    run = threading.Thread(target=lambda: result.setdefault("rc", _cli(argv)), daemon=True)
    run.start()
    seen = lambda text: out.append(capsys.readouterr().out) or text in "".join(out)  # noqa: E731
    _until(lambda: seen("midi: "), 60)
    with _sender() as port:
        port.send(cc(70, 127))
        _until(lambda: seen("temp 2.00"), 30)
        port.send(note(60))
    run.join(30)
    text = "".join(out) + capsys.readouterr().out
    assert result.get("rc") == 0 and f"midi: {midi.VIRTUAL_NAME}" in text and "temp 2.00" in text, text
    assert "chunks 400" not in text
