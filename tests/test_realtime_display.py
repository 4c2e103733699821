"""The status line shows the values a chunk is generated with (LFOs and glides applied), marked with '~'."""
import io
from dataclasses import replace

from codicodec_flow.realtime.display import Display, state_text
from codicodec_flow.realtime.state import Controls, Limits, apply_message, modulate
from test_realtime import W, make_engine

LIM = Limits(W)


def shown(c: Controls, index: int) -> str:
    """What the plain display prints for chunk `index` under controls c (the chunk event's state)."""
    return state_text({**c.to_json(), "effective": modulate(c, index, W).modulated_json(), "crossfade": None}, W)


def test_an_lfo_shows_the_effective_value_and_a_mark():
    c = apply_message(Controls(context_chunks=W), {"lfo": {"id": "w", "target": "temperature", "shape": "square",
                                                           "rate": 4, "depth": 0.5}}, LIM).controls
    assert "temp 1.50~" in shown(c, 0) and "temp 0.50~" in shown(c, 2)  # the square wave's two halves, not 1.00
    assert "cfg 1.00 " in shown(c, 0)  # an unmodulated control: no mark
    off = apply_message(c, {"lfo": {"id": "w", "on": False}}, LIM).controls
    assert "temp 1.00 " in shown(off, 0)  # an LFO switched off moves nothing and marks nothing


def test_a_glide_shows_where_it_is_and_the_gain_appears_when_moved():
    c = apply_message(Controls(context_chunks=W), {"set": {"cfg_scale": 3.0, "gain": 0.5}, "morph_chunks": 4},
                      LIM).controls
    assert "cfg 1.50~" in shown(c, 0) and "gain 0.88~" in shown(c, 0)  # 1/4 of the way: 1 + 0.5, 1 - 0.125
    arrived = replace(c, morph=None)  # what the engine does once a glide has arrived
    assert "cfg 3.00 " in shown(arrived, 5) and "gain 0.50 " in shown(arrived, 5)
    assert "gain" not in shown(Controls(context_chunks=W), 0)  # unity gain, unmoved: not shown


def test_an_lfod_nfe_shows_the_steps_it_rounds_to_and_steering_is_effective():
    c = apply_message(Controls(context_chunks=W, solver="euler", nfe=4),
                      {"lfo": [{"id": "n", "target": "nfe", "shape": "square", "rate": 2, "depth": 2},
                               {"id": "b", "target": "channel_bias", "index": 12, "shape": "square", "rate": 2,
                                "depth": 0.5}]}, LIM).controls
    assert "nfe 6~ (6 steps)" in shown(c, 0) and "nfe 2~ (2 steps)" in shown(c, 1)
    assert "channel_bias~ 12:+0.5" in shown(c, 0) and "channel_bias~ 12:-0.5" in shown(c, 1)
    plain = Controls(context_chunks=W)
    assert "steer: off" in shown(plain, 0) and "~" not in shown(plain, 0)


def test_the_plain_display_of_a_running_engine_shows_effective_values():
    engine = make_engine(max_chunks=2)
    engine.submit({"lfo": {"id": "w", "target": "temperature", "shape": "square", "rate": 2, "depth": 0.25}})
    out = io.StringIO()
    with Display(engine, live=False, stream=out, window=W):
        engine.run()
    lines = out.getvalue().splitlines()
    assert "temp 1.25~" in lines[0] and "temp 0.75~" in lines[1], lines
