"""OSC control: addresses translated into the JSON protocol's commands, a real python-osc client over UDP on
127.0.0.1 against a live engine, and the command end to end with --control osc:0."""
import json
import re
import socket
import threading
import time

import pytest
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.udp_client import SimpleUDPClient

from codicodec_flow.realtime.osc import OscControl, exposed, exposure_warning, handle_osc, osc_command
from codicodec_flow.realtime.protocol import ConnectionLimits
from codicodec_flow.realtime.sinks import NullSink
from codicodec_flow.realtime.state import ControlError
from test_realtime import _cli, ckpt, make_engine  # noqa: F401  (ckpt is a fixture)


@pytest.mark.parametrize("address, args, command", [
    ("/cf/temperature", [0.8], {"set": {"temperature": 0.8}}),
    ("/cf/set/temperature", [0.8], {"set": {"temperature": 0.8}}),
    ("/cf/add/temperature", [-0.1], {"add": {"temperature": -0.1}}),
    ("/cf/solver", ["heun"], {"set": {"solver": "heun"}}),
    ("/cf/nfe", [2.0], {"set": {"nfe": 2}}),  # Pd sends floats
    ("/cf/token_scale", [1, 1, 0.5, 1, 1, 1, 1, 1], {"set": {"token_scale": [1, 1, 0.5, 1, 1, 1, 1, 1]}}),
    ("/cf/token_scale/3", [0.5], {"set": {"token_scale": {"index": 3, "value": 0.5}}}),
    ("/cf/add/channel_bias/12", [0.2], {"add": {"channel_bias": {"index": 12, "value": 0.2}}}),
    ("/cf/seed", [123], {"seed": 123}),
    ("/cf/seed", ["random", "cut"], {"seed": "random", "mode": "cut"}),
    ("/cf/reset", ["steering"], {"reset": "steering"}),
    ("/cf/get", ["state"], {"get": "state"}),
    ("/cf/get", [], {"get": "state"}),
    ("/cf/help", [], {"help": True}),
    ("/cf/quit", [1.0], {"quit": True}),
    ("/cf/quit", [0.0], None),  # a button's release does nothing
    ("/cf/json", ['{"temperature": 0.5}'], '{"temperature": 0.5}'),
])
def test_addresses_become_the_json_protocols_commands(address, args, command):
    assert osc_command(address, args) == command


@pytest.mark.parametrize("address, args, needle", [
    ("/cf/dance", [1], "unknown OSC address '/cf/dance'"),
    ("/cf/set/dance", [1], "unknown OSC address '/cf/set/dance'"),
    ("/cf/set", [1], "name the control"),
    ("/other/temperature", [0.5], "commands live under /cf/"),
    ("/cf/temperature", [9.0], "temperature must lie in"),
    ("/cf/temperature", ["warm"], "finite number"),
    ("/cf/temperature", [], "takes one value, got 0 arguments"),
    ("/cf/nfe", [2.5], "nfe must be an integer"),
    ("/cf/token_scale", [1.0, 2.0], "token_scale needs 8 numbers, got 2"),
    ("/cf/token_scale/9", [0.5], "index must be an integer 0..7"),
    ("/cf/temperature/2", [0.5], "only token_scale"),
    ("/cf/add/seed", [1], "cannot be nudged"),
    ("/cf/seed", [5, "sideways"], "mode must be one of"),
    ("/cf/reset", ["everything"], "reset expects one of"),
    ("/cf/json", ["{oops"], "not valid JSON"),
])
def test_unknown_addresses_and_bad_values_get_an_error_and_change_nothing(address, args, needle):
    engine = make_engine()
    before = engine.pending
    replies = handle_osc(engine, address, args)
    assert [a for a, _ in replies] == ["/cf/error"] and needle in replies[0][1][0], replies
    assert engine.pending == before


def test_replies_go_through_the_same_validator_as_json():
    engine = make_engine()
    assert handle_osc(engine, "/cf/temperature", [0.800000011920929]) == [("/cf/ok", ["/cf/temperature"])]
    assert engine.pending.temperature == 0.8  # the float32 OSC carries is read as the decimal that was sent
    handle_osc(engine, "/cf/channel_bias/12", [0.25])
    (ok, _), (state, (text,)) = handle_osc(engine, "/cf/get", [])
    assert (ok, state) == ("/cf/ok", "/cf/state") and json.loads(text)["channel_bias"][12] == 0.25
    assert len(handle_osc(engine, "/cf/help", [])) > 3


class Listener:
    """A python-osc client that collects what comes back on its own port, in a thread."""

    def __init__(self, port: int):
        self.client = SimpleUDPClient("127.0.0.1", port)
        self.got: list[tuple[str, list]] = []
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            for m in self.client.get_messages(0.05):
                with self.lock:
                    self.got.append((m.address, list(m.params)))

    def send(self, address: str, *args) -> None:
        builder = OscMessageBuilder(address)
        for a in args:
            builder.add_arg(a)
        self.client.send(builder.build())

    def wait(self, until, timeout: float = 10.0) -> list[tuple[str, list]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                got = list(self.got)
            if until(got):
                return got
            time.sleep(0.01)
        raise AssertionError(f"timed out; received {[a for a, _ in got]}")

    def close(self):
        self.stop.set()
        self.thread.join(2)
        self.client.close()


def _replies(got, address):
    return [args for a, args in got if a == address]


def test_live_engine_over_udp_on_localhost():
    engine = make_engine(NullSink(paced=True, speed=6.0), max_chunks=None)  # runs until /cf/quit
    control = OscControl(engine, 0)  # 0: any free port
    assert control.sock.getsockname()[0] == "127.0.0.1" and control.host == "127.0.0.1" and control.port > 0
    engine.start()
    osc = Listener(control.port)
    try:
        osc.send("/cf/get", "state")  # the first message makes the client known: chunk events follow
        osc.wait(lambda got: _replies(got, "/cf/state") and _replies(got, "/cf/chunk"))
        osc.send("/cf/set/temperature", 0.5)
        osc.send("/cf/add/temperature", -0.25)
        osc.send("/cf/token_scale/3", 0.5)
        osc.send("/cf/channel_scale", *([0.75] * 64))
        osc.send("/cf/seed", 123, "cut")
        osc.send("/cf/dance", 1.0)
        osc.send("/cf/cfg_scale", 99.0)
        got = osc.wait(lambda got: len(_replies(got, "/cf/ok")) + len(_replies(got, "/cf/error")) >= 8)
        assert [r[0] for r in _replies(got, "/cf/ok")] == ["/cf/get", "/cf/set/temperature", "/cf/add/temperature",
                                                          "/cf/token_scale/3", "/cf/channel_scale", "/cf/seed"]
        errors = _replies(got, "/cf/error")
        assert "unknown OSC address" in errors[0][0] and "cfg_scale must lie in" in errors[1][0]
        c = engine.pending
        assert (c.temperature, c.token_scale[3], c.channel_scale, c.seed, c.cfg_scale) == (0.25, 0.5, (0.75,) * 64,
                                                                                          123, 1.0)
        index, rtf, buffer_s, underruns = _replies(got, "/cf/chunk")[-1]
        assert isinstance(index, int) and rtf > 0 and buffer_s >= 0 and underruns == 0
        osc.send("/cf/quit")
        osc.wait(lambda got: len(_replies(got, "/cf/ok")) == 7)
        assert engine.wait(10.0)
        got = osc.wait(lambda got: _replies(got, "/cf/end"))
    finally:
        engine.stop()
        osc.close()
        control.close()


def test_clients_are_bounded_and_a_vanished_one_is_forgotten():
    engine = make_engine()
    control = OscControl(engine, 0, limits=ConnectionLimits(max_clients=1, idle_s=0.3), capacity=8)
    first, second = Listener(control.port), Listener(control.port)
    try:
        first.send("/cf/temperature", 0.5)
        first.wait(lambda got: _replies(got, "/cf/ok"))
        second.send("/cf/temperature", 0.7)
        assert "too many OSC clients" in second.wait(lambda got: _replies(got, "/cf/error"))[0][1][0]
        assert engine.pending.temperature == 0.5
        first.close()  # gone without a word: after idle_s it gets no more events and frees its place
        time.sleep(0.5)
        chunk = {"event": "chunk", "index": 0, "rtf": 1.0, "buffer_s": 0.0, "underruns": 0}
        control._broadcast(chunk)
        assert not control._clients
        second.send("/cf/temperature", 0.7)
        second.wait(lambda got: _replies(got, "/cf/ok"))
        for _ in range(200):  # far more events than the queue holds: the engine's thread never waits
            control._broadcast(chunk)
        assert control._out.qsize() <= 8
    finally:
        second.close()
        control.close()


def test_replies_go_to_the_reply_port_on_the_senders_host():
    engine = make_engine()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as inbox:  # where the client listens, as Pd's [netreceive]
        inbox.bind(("127.0.0.1", 0))
        inbox.settimeout(10)
        control = OscControl(engine, 0, reply_port=inbox.getsockname()[1])
        sender = SimpleUDPClient("127.0.0.1", control.port)
        try:
            sender.send_message("/cf/temperature", 0.5)
            reply = OscMessage(inbox.recv(65536))
            assert (reply.address, reply.params) == ("/cf/ok", ["/cf/temperature"])
        finally:
            sender.close()
            control.close()


def test_only_loopback_hosts_count_as_private():
    assert not exposed("127.0.0.1") and not exposed("localhost") and not exposed("::1")
    assert exposed("0.0.0.0") and exposed("192.168.1.20") and exposed("my-laptop.local")
    assert "no authentication" in exposure_warning("0.0.0.0", 9000)


def test_command_with_osc_control_end_to_end(ckpt, capsys):  # noqa: F811
    argv = ["realtime", "--ckpt", str(ckpt), "--device", "cpu", "--sink", "null", "--pace", "realtime",
            "--max-chunks", "200", "--no-keys", "--plain", "--control", "osc:0"]
    result = {}
    run = threading.Thread(target=lambda: result.setdefault("rc", _cli(argv)), daemon=True)
    run.start()
    out, deadline = "", time.monotonic() + 60
    while not (found := re.search(r"control: osc on 127\.0\.0\.1:(\d+)", out)) and time.monotonic() < deadline:
        time.sleep(0.05)
        out += capsys.readouterr().out
    assert found, out
    osc = Listener(int(found.group(1)))
    try:
        osc.send("/cf/temperature", 0.5)
        osc.wait(lambda got: _replies(got, "/cf/ok") and _replies(got, "/cf/chunk"), timeout=30)
        osc.send("/cf/quit", 1)
        run.join(30)
        assert result.get("rc") == 0
        got = osc.wait(lambda got: _replies(got, "/cf/end"))
        assert _replies(got, "/cf/end")[0][0] < 200
    finally:
        osc.close()
    assert "warning" not in out + capsys.readouterr().out  # 127.0.0.1 needs no warning


@pytest.mark.parametrize("extra, needle", [
    (["--control", "osc:70000"], "a port is 0..65535"),
    (["--control", "tcp:0", "--osc-host", "0.0.0.0"], "apply to --control osc:PORT only"),
    (["--control", "osc:0", "--osc-reply-port", "0"], "--osc-reply-port"),
    (["--control", "osc:0", "--osc-host", "203.0.113.7"], "cannot listen on 203.0.113.7"),
])
def test_command_osc_errors_are_one_line(ckpt, capsys, extra, needle):  # noqa: F811
    assert _cli(["realtime", "--ckpt", str(ckpt), "--device", "cpu", "--sink", "null", "--max-chunks", "1",
                 *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_osc_command_raises_control_errors_only():
    with pytest.raises(ControlError, match="at most one index"):
        osc_command("/cf/channel_bias/1/2", [0.1])
