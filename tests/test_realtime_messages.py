"""The control protocol's help and its refusals: every command has an example, and a bad preset name or MIDI learn
target is named in the error while nothing is changed or written."""
import json

import pytest

from codicodec_flow.codec import load_codec
from codicodec_flow.realtime.engine import Engine, EngineConfig
from codicodec_flow.realtime.midi import MidiControl
from codicodec_flow.realtime.midi_map import DEFAULT_MAP
from codicodec_flow.realtime.osc import handle_osc
from codicodec_flow.realtime.presets import PresetStore
from codicodec_flow.realtime.protocol import HELP, handle_line
from codicodec_flow.realtime.sinks import NullSink
from codicodec_flow.realtime.state import COMMANDS, Controls
from test_realtime import W, make_engine, make_gen


def engine_with_presets(folder) -> Engine:
    return Engine(make_gen(), load_codec("spectral"), NullSink(), EngineConfig(max_chunks=6), Controls(context_chunks=W),
                  presets=PresetStore(folder))


def test_help_has_an_example_of_every_command():
    examples = " ".join(HELP.values())
    missing = [c for c in COMMANDS if f'"{c}"' not in examples]
    assert not missing, f"commands without an example in protocol.HELP: {missing}"
    engine = make_engine()
    MidiControl(engine, [], DEFAULT_MAP).close()
    assert "midi_learn" in handle_line(engine, '{"help": true}')[1]["commands"]


@pytest.mark.parametrize("name, problem", [
    ("../etc/passwd", "'/' cannot be in a name"),
    (".hidden", "it starts with '.'"),
    ("verse ", "it ends with ' '"),
    ("", "it is empty"),
    ("x" * 65, "has 65 characters"),
    (3, "3 is a int, not text"),
    ("chorus?", "'?' cannot be in a name"),
])
def test_a_bad_preset_name_is_named_and_nothing_is_changed_or_written(tmp_path, name, problem):
    engine = engine_with_presets(tmp_path)
    before = engine.pending
    msg = json.dumps({"preset": {"save": name}, "temperature": 0.5})
    (reply,) = handle_line(engine, msg)
    assert reply["event"] == "error" and problem in reply["message"] and "bad preset name" in reply["message"]
    assert engine.pending == before and list(tmp_path.iterdir()) == []  # no file, no temporary, no folder change
    (osc,) = handle_osc(engine, "/cf/preset/save", [".hidden"])  # OSC gets the same words
    assert osc[0] == "/cf/error" and "it starts with '.'" in osc[1][0]


def test_a_bad_learn_target_beside_a_preset_save_writes_nothing(tmp_path):
    engine = engine_with_presets(tmp_path)
    ctl = MidiControl(engine, [], DEFAULT_MAP, tmp_path / "map.json")
    try:
        for target, problem in (("seed", "MIDI cannot drive 'seed'"), ("temperature/3", "only token_scale"),
                                ("channel_bias/64", "index must be 0..63"), (7, "names the control")):
            (reply,) = handle_line(engine, json.dumps({"preset": {"save": "verse"}, "midi_learn": target,
                                                       "gain": 0.5}))
            assert reply["event"] == "error" and problem in reply["message"], (target, reply)
            assert ctl.learning is None and engine.pending == Controls(context_chunks=W)
            assert list(tmp_path.iterdir()) == []  # neither the preset nor the map was written
        (reply,) = handle_line(engine, '{"preset": {"save": "verse"}, "midi_learn": "channel_bias/12"}')
        assert reply["event"] == "ok" and ctl.learning == "channel_bias/12" and (tmp_path / "verse.json").is_file()
    finally:
        ctl.close()
