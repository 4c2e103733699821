"""The shipped OSC patches: the Pure Data patch drives a live engine from a real, headless Pd (skipped without
`pd`), both patches are well formed, use only the objects they claim, and send only addresses osc.py accepts."""
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from codicodec_flow.realtime.osc import OscControl, event_messages, osc_command
from codicodec_flow.realtime.sinks import NullSink
from test_realtime import make_engine

PATCHES = Path(__file__).resolve().parents[1] / "patches"
PD_PATCH, MAX_PATCH = PATCHES / "codicodec-flow.pd", PATCHES / "codicodec-flow.maxpat"
PD_VANILLA = {"loadbang", "netsend", "oscformat", "oscparse", "list", "route", "unpack", "print", "r", "s", "t",
              "hsl", "bng"}  # all in Pd vanilla 0.51 (oscformat/oscparse since 0.46, netsend -b since 0.45)
REPLIES = {address for e in ({"event": "ok"}, {"event": "error", "message": ""}, {"event": "state", "state": {}},
                             {"event": "chunk", "index": 0, "rtf": 1.0, "buffer_s": 0.0, "underruns": 0},
                             {"event": "end", "chunks": 0, "rtf": 1.0, "underruns": 0})
           for address, _ in event_messages(e)}


def pd_boxes(text: str) -> tuple[list[list[str]], list[tuple[int, int, int, int]]]:
    """The boxes (#X lines other than connect, as atoms) and the connections of a Pd patch."""
    records = [r.strip() for r in re.split(r"(?<!\\);\s*\n", text) if r.strip()]
    assert records[0].startswith("#N canvas") and not any(r.startswith("#N canvas") for r in records[1:])
    boxes, wires = [], []
    for r in records[1:]:
        atoms = r.rstrip(";").split()
        assert atoms[0] == "#X", r
        if atoms[1] == "connect":
            wires.append(tuple(int(a) for a in atoms[2:6]))
        else:
            boxes.append(atoms[1:])
    return boxes, wires


def test_pd_patch_uses_vanilla_objects_and_sends_addresses_the_engine_accepts():
    boxes, wires = pd_boxes(PD_PATCH.read_text())
    classes = {b[3] for b in boxes if b[0] == "obj"}
    assert classes <= PD_VANILLA, classes - PD_VANILLA
    assert all(0 <= a < len(boxes) and 0 <= b < len(boxes) for a, _, b, _ in wires)
    formats = [b[4:] for b in boxes if b[0] == "obj" and b[3] == "oscformat"]
    for parts in formats:  # /cf/set is completed by a "set cf set NAME" message; the rest are whole addresses
        address = "/" + "/".join(parts) + ("/temperature" if parts == ["cf", "set"] else "")
        args = {"/cf/seed": ["random", "cut"], "/cf/reset": ["steering"], "/cf/get": ["state"]}.get(address, [1.0])
        assert osc_command(address, args), address
    receive_at = {"hsl": 11, "bng": 9}  # where each class keeps its receive name: obj x y hsl w h lo hi log init snd rcv
    receives = {b[receive_at[b[3]]] for b in boxes if b[0] == "obj" and b[3] in receive_at} | \
               {b[8] for b in boxes if b[0] == "floatatom"}  # floatatom x y width lo hi label-side label rcv snd
    assert {"cf-temperature", "cf-cfg_scale", "cf-nfe", "cf-context_chunks", "cf-seed", "cf-random", "cf-reset",
            "cf-port"} <= receives
    routed = {name for b in boxes if b[0] == "obj" and b[3] == "route" and b[4] != "cf" for name in b[4:]}
    assert {f"/cf/{name}" for name in routed} == REPLIES - {"/cf/ok"}  # ok: shown as the last reply


def test_max_patch_is_valid_json_with_the_expected_objects_and_addresses():
    patcher = json.loads(MAX_PATCH.read_text())["patcher"]
    boxes = {b["box"]["id"]: b["box"] for b in patcher["boxes"]}
    for line in patcher["lines"]:
        (src, outlet), (dst, inlet) = line["patchline"]["source"], line["patchline"]["destination"]
        assert outlet < boxes[src]["numoutlets"] and inlet < boxes[dst]["numinlets"], line
    texts = [b.get("text", "") for b in boxes.values() if b["maxclass"] in ("newobj", "message")]
    assert "udpsend 127.0.0.1 9000" in texts and "udpreceive 9001" in texts
    into_send = {line["patchline"]["source"][0] for line in patcher["lines"]
                 if boxes[line["patchline"]["destination"][0]].get("text", "").startswith("udpsend")}
    sent = []
    for ident in into_send:  # every message udpsend gets, as an address and arguments
        text = boxes[ident]["text"]
        if text.startswith("prepend "):
            address = text.split()[1]
            feeders = [boxes[line["patchline"]["source"][0]] for line in patcher["lines"]
                       if line["patchline"]["destination"][0] == ident]
            for f in feeders:
                sent.append((address, f["text"].split() if f["maxclass"] == "message" else [1]))
        else:
            address, *args = text.split()
            sent.append((address, [float(a) if re.fullmatch(r"-?[\d.]+", a) else a for a in args]))
    assert {a for a, _ in sent} >= {"/cf/temperature", "/cf/cfg_scale", "/cf/nfe", "/cf/context_chunks", "/cf/seed",
                                    "/cf/reset", "/cf/get"}
    engine = make_engine()
    for address, args in sent:
        assert osc_command(address, args), (address, args)
        engine.submit(osc_command(address, args))  # and the values themselves pass the validator
    route = next(t for t in texts if t.startswith("route "))
    assert set(route.split()[1:]) - {"/cf/help"} <= REPLIES


@pytest.mark.skipif(shutil.which("pd") is None, reason="Pure Data is not installed (Debian: apt-get install "
                                                       "puredata-core)")
def test_pure_data_drives_a_live_engine(tmp_path):
    """A real Pd, headless, opens the shipped patch and plays it through its receive names (as a musician's own
    patch or `pd -send` would); the engine's controls change and Pd receives the replies and chunk events."""
    listen = tmp_path / "listen.pd"  # prints every reply the shipped patch passes on to [s cf-reply]
    listen.write_text("#N canvas 0 50 300 200 12;\n#X obj 20 20 r cf-reply;\n#X obj 20 50 print reply;\n"
                      "#X connect 0 0 1 0;\n")
    engine = make_engine(NullSink(paced=True, speed=6.0), max_chunks=None)
    control = OscControl(engine, 0)
    engine.start()
    sends = [f"cf-port {control.port}", "cf-temperature 0.5", "cf-cfg_scale 1.5", "cf-nfe 2", "cf-seed 123",
             "cf-set token_bias 0.25", "cf-set channel_scale/5 0.5", "cf-get bang"]
    pd = subprocess.Popen(["pd", "-nogui", "-noaudio", "-nomidi", "-open", str(PD_PATCH), "-open", str(listen),
                           *[a for s in sends for a in ("-send", s)]],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(pd.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (any(ln.startswith("cf-state:") for ln in lines)
                                                  and any(ln.startswith("reply: chunk") for ln in lines)):
            time.sleep(0.05)
        c = engine.pending
        assert (c.temperature, c.cfg_scale, c.nfe, c.seed, c.token_bias, c.channel_scale[5]) == \
            (0.5, 1.5, 2, 123, (0.25,) * 8, 0.5), lines
        oks = [ln.split()[2] for ln in lines if ln.startswith("reply: ok")]
        assert oks == ["/cf/temperature", "/cf/cfg_scale", "/cf/nfe", "/cf/seed", "/cf/set/token_bias",
                       "/cf/set/channel_scale/5", "/cf/get"], lines
        state = next(ln for ln in lines if ln.startswith("cf-state:"))  # the state, as JSON, in the Pd window
        assert '"temperature":0.5' in state and '"seed":123' in state, state
        chunks = [ln.split() for ln in lines if ln.startswith("reply: chunk")]
        assert chunks, (engine.error, lines)
        chunk = chunks[0]
        assert len(chunk) == 6 and float(chunk[3]) > 0  # index, rtf, buffer_s, underruns
        assert not [ln for ln in lines if "error" in ln or "couldn't create" in ln], lines
    finally:
        pd.terminate()
        pd.wait(10)
        engine.stop()
        engine.wait(10)  # the generation thread out of torch before the interpreter may exit
        control.close()
