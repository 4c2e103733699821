"""Live control surfaces: the JSON protocol (stdin-like streams, TCP, WebSocket on 127.0.0.1), keys, the display."""
import base64
import hashlib
import io
import json
import os
import socket
import struct
import threading
import time
from dataclasses import replace

import pytest

from codicodec_flow.config import LIVE_SAMPLING
from codicodec_flow.realtime.display import Display, state_text
from codicodec_flow.realtime.engine import EngineConfig
from codicodec_flow.realtime.keyboard import KeyControls, RawKeys
from codicodec_flow.realtime.protocol import ConnectionLimits, StdioControl, TcpControl, handle_line
from codicodec_flow.realtime.session import RealtimeConfig, run_realtime
from codicodec_flow.realtime.sinks import NullSink
from codicodec_flow.realtime.state import Controls
from codicodec_flow.realtime.websocket import WebSocketControl, normalise_origin
from codicodec_flow.solvers import SOLVERS
from test_realtime import W, ckpt, make_engine  # noqa: F401  (ckpt is a fixture)


class Lines:
    """A thread-safe text sink that splits what is written into JSON events."""

    def __init__(self):
        self.text, self.lock = "", threading.Lock()

    def write(self, s: str) -> None:
        with self.lock:
            self.text += s

    def flush(self) -> None:
        pass

    def events(self) -> list[dict]:
        with self.lock:
            return [json.loads(line) for line in self.text.splitlines() if line.strip()]


def _chunks(events):
    return [e for e in events if e["event"] == "chunk"]


@pytest.mark.parametrize("line, needle", [
    ("{not json", "not valid JSON"),
    ('{"set": {"temperature": 99}}', "temperature must lie in"),
    ('{"set": {"temperature": "warm"}}', "finite number"),
    ('{"dance": 1}', "unknown command 'dance'"),
    ('"temperature"', "must be a non-empty JSON object"),
    ('{"context_chunks": 0}', "context_chunks must be an integer"),
    ('{"token_bias": {"index": "a", "value": 1}}', "index must be an integer"),
    ("[" * 100_000, "the limit is"),
    ("[" * 60_000, "not valid JSON"),
    ('{"seed": ' + "9" * 5000 + "}", "not valid JSON"),
    ('{"temperature": 1e999}', "finite number"),
])
def test_malformed_lines_get_an_error_event_and_change_nothing(line, needle):
    engine = make_engine()
    before = engine.pending
    replies = handle_line(engine, line)
    assert len(replies) == 1 and replies[0]["event"] == "error" and needle in replies[0]["message"]
    assert engine.pending == before


def test_valid_lines_are_acknowledged_and_queries_answered():
    engine = make_engine()
    assert handle_line(engine, "   ") == []
    assert handle_line(engine, '{"temperature": 0.7}') == [{"event": "ok"}]
    ok, state = handle_line(engine, '{"get": "state"}')
    assert state["event"] == "state" and state["state"]["temperature"] == 0.7 and state["state"]["next_chunk"] == 0
    assert "seed" in handle_line(engine, '{"help": true}')[1]["commands"]


def test_stdin_protocol_applies_commands_and_streams_chunk_events():
    engine = make_engine(max_chunks=3)
    commands = "\n".join(['{"set": {"temperature": 0.5}}', "oops", '{"channel_bias": {"index": 2, "value": 1}}',
                          '{"get": "state"}']) + "\n"
    out = Lines()
    control = StdioControl(engine, io.StringIO(commands), out)
    deadline = time.monotonic() + 5
    while len(out.events()) < 5 and time.monotonic() < deadline:  # the commands are read before the stream starts
        time.sleep(0.01)
    engine.run()
    control.close()
    events = out.events()
    assert [e["event"] for e in events[:5]] == ["ok", "error", "ok", "ok", "state"]
    chunks = _chunks(events)
    assert len(chunks) == 3 and events[-1]["event"] == "end"
    assert all(c["state"]["temperature"] == 0.5 and c["state"]["channel_bias"][2] == 1.0 for c in chunks)


def _read_events(sock_file, until, timeout=10.0):
    got, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = sock_file.readline()
        if not line:
            break
        got.append(json.loads(line))
        if until(got):
            return got
    raise AssertionError(f"no matching event in {[e['event'] for e in got]}")


def test_tcp_protocol_on_localhost_changes_the_next_chunks():
    engine = make_engine(NullSink(paced=True, speed=6.0), max_chunks=None)  # runs until stopped below
    control = TcpControl(engine, 0)  # 0: any free port
    assert control.server.server_address[0] == "127.0.0.1"
    engine.start()
    try:
        with socket.create_connection(("127.0.0.1", control.port), timeout=10) as sock:
            f = sock.makefile("rw")
            first = _read_events(f, lambda ev: _chunks(ev))
            sent_after = _chunks(first)[-1]["index"]
            f.write('{"set": {"temperature": 0.25}, "seed": 5, "mode": "cut"}\n{"set": \n')
            f.flush()
            got = _read_events(f, lambda ev: any(c["state"]["temperature"] == 0.25 for c in _chunks(ev)))
            replies = [e["event"] for e in got if e["event"] != "chunk"]
            assert replies[:2] == ["ok", "error"]
            changed = next(c for c in _chunks(got) if c["state"]["temperature"] == 0.25)
            assert changed["index"] > sent_after and changed["state"]["seed"] == 5
            assert all(c["state"]["temperature"] == 1.0 for c in _chunks(first + got) if c["index"] < changed["index"])
    finally:
        engine.stop()
        control.close()


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept a server must answer a key with (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()


def _ws_frame(text: str) -> bytes:
    payload, mask = text.encode(), os.urandom(4)
    head = bytes([0x81, 0x80 | len(payload)]) if len(payload) < 126 else bytes([0x81, 0x80 | 126]) + struct.pack(
        ">H", len(payload))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _ws_read(f) -> str:
    b0, b1 = f.read(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack(">H", f.read(2))[0]
    elif n == 127:
        n = struct.unpack(">Q", f.read(8))[0]
    return f.read(n).decode()


def _ws_connect(port: int, origin: str | None):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    origin_line = "" if origin is None else f"Origin: {origin}\r\n"
    sock.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{origin_line}\r\n".encode())
    f = sock.makefile("rb")
    status = f.readline().decode()
    headers = {}
    while (line := f.readline().decode().strip()):
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    return sock, f, status, headers, key


def test_websocket_protocol_for_local_pages_only():
    engine = make_engine(max_chunks=2)
    control = WebSocketControl(engine, 0)
    try:
        sock, f, status, headers, key = _ws_connect(control.port, "http://localhost:8000")
        assert "101" in status and headers["sec-websocket-accept"] == accept_key(key)
        sock.sendall(_ws_frame('{"set": {"cfg_scale": 1.5}}') + _ws_frame("{bad") + _ws_frame('{"get": "state"}'))
        replies = [json.loads(_ws_read(f)) for _ in range(4)]
        assert [r["event"] for r in replies] == ["ok", "error", "ok", "state"]
        assert replies[3]["state"]["cfg_scale"] == 1.5
        sock.close()
        sock, f, status, _, _ = _ws_connect(control.port, "https://evil.example")
        assert "403" in status  # any web site could otherwise steer the stream from the browser
        sock.close()
    finally:
        control.close()


@pytest.mark.parametrize("origin, accepted", [
    ("http://localhost:8000", True), ("http://127.0.0.1", True), ("https://127.0.0.5:9", True),
    ("http://[::1]:5173", True), (None, True),  # no Origin: a program, not a browser
    ("https://studio.example", True), ("https://STUDIO.example:443", True),  # allowed below, as browsers spell it
    ("null", False),  # sandboxed frames and data: URLs of any site, file:// pages
    ("file://", False), ("https://evil.example", False), ("https://studio.example:8443", False),
    ("http://localhost.evil.example", False), ("http://127.0.0.1.evil.example", False),
])
def test_websocket_accepts_local_pages_and_allowed_origins_only(origin, accepted):
    engine = make_engine(max_chunks=2)
    control = WebSocketControl(engine, 0, allow_origins=("https://studio.example/",))
    try:
        sock, f, status, _, _ = _ws_connect(control.port, origin)
        assert ("101" in status) == accepted and ("403" in status) == (not accepted), status
        if accepted:
            sock.sendall(_ws_frame('{"quit": true}'))
            assert json.loads(_ws_read(f)) == {"event": "ok", "quit": True}
        else:
            assert not engine.stopping
        sock.close()
    finally:
        control.close()


@pytest.mark.parametrize("given, expect", [
    ("HTTPS://Studio.Example:443/", "https://studio.example"), ("http://localhost:80", "http://localhost"),
    ("http://[::1]:8080", "http://[::1]:8080"), ("chrome-extension://abcdef", "chrome-extension://abcdef"),
])
def test_allowed_origins_are_normalised(given, expect):
    assert normalise_origin(given) == expect


@pytest.mark.parametrize("bad", ["null", "file://", "https://x.example/page.html", "x.example", "*",
                                 "https://x.example:99999"])
def test_origins_that_name_no_site_cannot_be_allowed(bad):
    with pytest.raises(ValueError):
        normalise_origin(bad)


@pytest.mark.parametrize("extra, said", [
    (["--control", "ws:0", "--allow-origin", "null"], "--allow-origin: 'null' is what sandboxed frames"),
    (["--control", "tcp:0", "--allow-origin", "https://a.example"], "applies to --control ws:PORT only"),
])
def test_realtime_refuses_bad_allow_origin(ckpt, capsys, extra, said):  # noqa: F811
    from codicodec_flow.commands.cli import main
    assert main(["realtime", "--ckpt", str(ckpt), "--sink", "null", "--max-chunks", "1", *extra]) == 2
    assert said in capsys.readouterr().err


def _eof(f, timeout=5.0) -> bool:
    """Whether the server closes the connection (after whatever it still sends) within timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not f.read(1):
            return True
    return False


def test_tcp_control_bounds_its_clients_and_closes_idle_ones():
    engine = make_engine()
    control = TcpControl(engine, 0, ConnectionLimits(max_clients=2, idle_s=2.0))
    try:
        held = [socket.create_connection(("127.0.0.1", control.port), timeout=10) for _ in range(2)]
        files = [sock.makefile("r") for sock in held]
        for sock, f in zip(held, files):  # both are served
            sock.sendall(b'{"get": "state"}\n')
            assert [json.loads(f.readline())["event"] for _ in range(2)] == ["ok", "state"]
        t0 = time.monotonic()
        threads = threading.active_count()
        for _ in range(20):  # more are told why and closed, without a thread each
            with socket.create_connection(("127.0.0.1", control.port), timeout=10) as extra:
                f = extra.makefile("r")
                refused = json.loads(f.readline())
                assert refused["event"] == "error" and "too many control connections (2 at most)" in refused["message"]
                assert f.readline() == ""
        assert threading.active_count() <= threads and control.server.active == 2
        time.sleep(max(0.0, t0 + 1.0 - time.monotonic()))
        held[0].sendall(b"\n")  # any line, even an empty one, keeps a connection alive
        idle = json.loads(files[1].readline())  # silent for 2 s: told why, then closed
        assert idle["event"] == "error" and "no message for 2 s" in idle["message"] and files[1].readline() == ""
        held[0].sendall(b'{"get": "state"}\n')
        assert json.loads(files[0].readline())["event"] == "ok"
        deadline = time.monotonic() + 5
        while control.server.active != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert control.server.active == 1  # the idle one's place is free again
        for sock in held:
            sock.close()
    finally:
        control.close()


def test_websocket_bounds_handshakes_clients_and_idle_time():
    engine = make_engine()
    limits = ConnectionLimits(max_clients=2, idle_s=2.0, handshake_s=0.5, handshake_bytes=4096, handshake_headers=20)
    control = WebSocketControl(engine, 0, limits=limits)
    try:
        slow = socket.create_connection(("127.0.0.1", control.port), timeout=10)
        slow.sendall(b"GET / HTTP/1.1\r\n")  # ... and nothing more
        f = slow.makefile("rb")
        assert b"408" in f.readline() and _eof(f)
        for head in (b"X-Filler: " + b"a" * 100 + b"\r\n") * 60, b"X-A: b\r\n" * 30:  # too long; too many lines
            big = socket.create_connection(("127.0.0.1", control.port), timeout=10)
            big.sendall(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Key: x\r\n" + head + b"\r\n")
            f = big.makefile("rb")
            assert b"431" in f.readline() and _eof(f)
            big.close()
        a, fa, status_a, _, _ = _ws_connect(control.port, "http://localhost:3000")
        b, fb, status_b, _, _ = _ws_connect(control.port, None)
        t0 = time.monotonic()
        assert "101" in status_a and "101" in status_b
        c, fc, status_c, _, _ = _ws_connect(control.port, "http://localhost:3000")
        assert "503" in status_c and "too many control connections" in fc.read().decode()
        c.close()
        time.sleep(max(0.0, t0 + 1.0 - time.monotonic()))
        a.sendall(_ws_frame(""))  # any message keeps it alive
        idle = json.loads(_ws_read(fb))  # silent for 2 s
        assert idle["event"] == "error" and "no message for 2 s" in idle["message"]
        assert fb.read(2) == bytes([0x88, 2])  # then a close frame
        a.sendall(_ws_frame('{"get": "state"}'))
        assert json.loads(_ws_read(fa))["event"] == "ok"
        a.close()
        b.close()
    finally:
        control.close()


def test_session_with_stdin_control_keeps_stdout_pure_json(ckpt, capsys):  # noqa: F811
    out = Lines()
    cfg = RealtimeConfig(ckpt=str(ckpt), device="cpu", sink="null", control="stdin", engine=EngineConfig(max_chunks=3),
                         sample=replace(LIVE_SAMPLING, seed=3))
    result = run_realtime(cfg, io.StringIO(""), out)
    events = out.events()  # every line parses as JSON
    assert result.summary.chunks == 3 and len(_chunks(events)) == 3 and events[-1]["event"] == "end"
    assert _chunks(events)[0]["state"]["seed"] == 3
    assert "sustained" in capsys.readouterr().err  # people read stderr


# ---------------------------------------------------------------------------------------------- keys and display

def test_keys_become_commands():
    engine = make_engine()
    notes: list[str] = []
    keys = KeyControls(engine, notes.append, lambda: notes.append("help"))
    for k in "tt]2s":
        keys.press(k)
    c = engine.pending
    after = list(SOLVERS)[(list(SOLVERS).index(LIVE_SAMPLING.solver) + 1) % len(SOLVERS)]  # `s`: the next solver
    assert (round(c.temperature, 6), c.context_chunks, c.nfe, c.solver) == (0.8, W, 2, after)
    seed = c.seed
    keys.press("N")
    assert engine.pending.seed != seed and engine._seed_mode == "cut"
    for k in ["k", ".", ".", "B", "\x1b[A", "+"]:  # channels, cursor to channel 1, bias +0.1, scale +0.2
        keys.press(k)
    c = engine.pending
    assert c.channel_bias[1] == 0.1 and c.channel_scale[1] == 1.2 and sum(c.channel_bias) == 0.1
    keys.press("h")
    assert "help" in notes and "steering channel 1" in notes
    keys.press("r")
    assert not engine.pending.steered
    keys.press("q")
    assert engine.stopping


def test_raw_keys_read_a_terminal_and_restore_it():
    termios = pytest.importorskip("termios")
    master, slave = os.openpty()
    with os.fdopen(slave, "r") as tty_in:
        before = termios.tcgetattr(slave)
        got: list[str] = []
        with RawKeys(got.append, tty_in) as keys:
            assert keys.active
            os.write(master, b"t\x1b[Cq")
            deadline = time.monotonic() + 5
            while len(got) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert got == ["t", "\x1b[C", "q"]
        assert termios.tcgetattr(slave) == before  # the terminal is as we found it
    os.close(master)
    with RawKeys(got.append, io.StringIO()) as keys:
        assert not keys.active  # no terminal: keys are off, nothing breaks


def test_plain_display_prints_one_line_per_chunk():
    engine = make_engine(max_chunks=2)
    out = io.StringIO()
    with Display(engine, live=False, stream=out, window=W):
        engine.run()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("chunk     0") and "x real time" in lines[0]
    assert f"ctx {W}/{W}" in lines[1] and "steer: off" in lines[1]
    steered = {**Controls(context_chunks=W).to_json(), "crossfade": [1, 4]}
    steered["token_bias"] = [0.0, 0.5] + [0.0] * 6
    assert "token_bias 1:+0.5" in state_text(steered) and "crossfade 1/4" in state_text(steered)
