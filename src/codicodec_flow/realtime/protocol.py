"""Line-delimited JSON control protocol, so a front end (a DAW bridge, a web page, Max/MSP) can drive a stream.

In: one JSON object per line, the commands of state.py, e.g.
    {"set": {"temperature": 0.8}}   {"seed": 123, "mode": "cut"}   {"channel_bias": {"index": 3, "value": 0.5}}
Out: one JSON object per line, each with an "event":
    {"event": "ok"}                                   a command was accepted; it applies from the next chunk
    {"event": "state", "state": {...}}                the answer to {"get": "state"}
    {"event": "help", "commands": {...}}              the answer to {"help": true}
    {"event": "error", "message": "..."}              a malformed message; nothing was changed
    {"event": "chunk", "index", "compute_s", "rtf", "buffer_s", "underruns", "latency_s", "state": {...}}
    {"event": "end", "chunks", "rtf", ...}            the session's summary
Transports: stdin/stdout, or a TCP port on 127.0.0.1 only (never reachable from another machine);
websocket.py adds a WebSocket port for web pages. Every client gets every chunk event; replies go
to the client that asked. A client that stops reading loses events, never stalls the stream.
"""
from __future__ import annotations

import json
import math
import queue
import socketserver
import sys
import threading
from typing import Callable, TextIO

from ..errors import FlowError
from .state import ControlError

CONTROL_HELP = "none | stdin | tcp:PORT | ws:PORT (ports listen on 127.0.0.1 only; 0 picks a free one)"

HELP = {
    "set": '{"set": {"temperature": 0.8, "solver": "heun", "nfe": 2, "cfg_scale": 1.5, "context_chunks": 8}}',
    "shorthand": '{"temperature": 0.8}  (any control name at the top level)',
    "add": '{"add": {"temperature": -0.1, "context_chunks": 1, "token_bias": {"index": 2, "value": 0.1}}}  (clamped)',
    "vectors": '{"token_scale": [8 numbers]}, {"channel_bias": {"index": 3, "value": 0.5}}, {"token_bias": 0.2}',
    "seed": '{"seed": 123, "mode": "crossfade"}  or  {"seed": "random", "mode": "cut"}',
    "reset": '{"reset": "steering"}  (scale/bias)  or  {"reset": "all"}  (everything but the seed)',
    "get": '{"get": "state"}', "quit": '{"quit": true}', "help": '{"help": true}',
}
MAX_LINE = 64 * 1024  # longer lines are refused rather than buffered without bound


def handle_line(engine, line: str) -> list[dict]:
    """Apply one line to the engine; the events to send back to the client that sent it."""
    line = line.strip()
    if not line:
        return []
    if len(line) > MAX_LINE:
        return [_error(f"message of {len(line)} characters; the limit is {MAX_LINE}")]
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, a 5000-digit number, [[[[...
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else "too deeply nested" if isinstance(
            exc, RecursionError) else str(exc)
        return [_error(f"not valid JSON ({why}); send one object per line, e.g. "
                       f'{{"set": {{"temperature": 0.9}}}}')]
    try:
        upd = engine.submit(msg)
    except ControlError as exc:
        return [_error(str(exc))]
    replies: list[dict] = [{"event": "ok", **({"quit": True} if upd.quit else {})}]
    if upd.get:
        replies.append({"event": "state", "state": engine.state()})
    if upd.help:
        replies.append({"event": "help", "commands": HELP})
    return replies


def _error(message: str) -> dict:
    return {"event": "error", "message": message}


def encode_event(event: dict) -> str:
    """One event as a JSON line; non-finite numbers, which JSON lacks, become null."""
    return json.dumps(_nulls(event), separators=(",", ":")) + "\n"


def _nulls(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _nulls(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_nulls(x) for x in v]
    return v


class Client:
    """One connected front end: events queue up and a writer thread sends them, so a slow reader
    drops events (counted) instead of blocking the generation thread."""

    def __init__(self, write: Callable[[str], None], capacity: int = 256):
        self._write, self._queue, self.dropped = write, queue.Queue(capacity), 0
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="realtime-client", daemon=True)
        self._thread.start()

    def send(self, event: dict) -> None:
        if self.closed.is_set():
            return
        try:
            self._queue.put_nowait(encode_event(event))
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while True:
            text = self._queue.get()
            if text is None:
                break
            try:
                self._write(text)
            except (OSError, ValueError):  # the peer went away, or the stream was closed
                break
        self.closed.set()

    def close(self, flush_timeout: float = 1.0) -> None:
        """Send what is queued (up to flush_timeout), then stop."""
        try:
            self._queue.put(None, timeout=flush_timeout)
        except queue.Full:
            pass
        self._thread.join(flush_timeout)
        self.closed.set()


class Hub:
    """Fans the engine's events out to every connected client."""

    def __init__(self, engine):
        self.engine, self._clients, self._lock = engine, set(), threading.Lock()
        engine.subscribe(self.broadcast)

    def add(self, client: Client) -> None:
        with self._lock:
            self._clients.add(client)

    def remove(self, client: Client) -> None:
        with self._lock:
            self._clients.discard(client)

    def broadcast(self, event: dict) -> None:
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            c.send(event)

    def serve(self, client: Client, lines, stay: bool = False) -> None:
        """Read command lines until they end (or the client closes), answering each; stay=True keeps
        sending events after the commands end (stdin's end is not the end of stdout)."""
        self.add(client)
        try:
            for line in lines:
                if client.closed.is_set():
                    break
                for reply in handle_line(self.engine, line):
                    client.send(reply)
        finally:
            if not stay:
                self.remove(client)


class StdioControl:
    """Commands on stdin, events on stdout. The end of stdin ends the commands, not the stream."""

    def __init__(self, engine, stdin: TextIO | None = None, stdout: TextIO | None = None):
        stdin, stdout = stdin or sys.stdin, stdout or sys.stdout

        def write(text: str) -> None:
            stdout.write(text)
            stdout.flush()

        self.hub, self.client = Hub(engine), Client(write)
        self._thread = threading.Thread(target=self.hub.serve, args=(self.client, stdin, True), name="realtime-stdin",
                                        daemon=True)  # daemon: a blocked read of a terminal must not hold the exit
        self._thread.start()

    def close(self) -> None:
        self.client.close()


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        sock = self.request

        def write(text: str) -> None:
            sock.sendall(text.encode())

        client = Client(write)
        try:
            self.server.hub.serve(client, (raw.decode("utf-8", "replace") for raw in iter(
                lambda: self.rfile.readline(MAX_LINE + 2), b"")))
        except OSError:
            pass
        finally:
            client.close()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class LocalControl:
    """A protocol server on 127.0.0.1 only (never another interface); port 0 picks a free one (see .port)."""

    def __init__(self, engine, port: int, handler: type[socketserver.BaseRequestHandler], scheme: str):
        if not 0 <= port <= 65535:
            raise FlowError(f"--control {scheme}:{port}: a port is 0..65535 (0 picks a free one)")
        try:
            self.server = _Server(("127.0.0.1", port), handler)
        except OSError as exc:
            raise FlowError(f"--control {scheme}:{port}: cannot listen on 127.0.0.1:{port} ({exc.strerror}); "
                            f"pick another port") from None
        self.server.hub = Hub(engine)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"realtime-{scheme}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TcpControl(LocalControl):
    """Line-delimited JSON over plain TCP (e.g. `nc 127.0.0.1 PORT`)."""

    def __init__(self, engine, port: int):
        super().__init__(engine, port, _Handler, "tcp")


def open_control(spec: str, engine, stdin: TextIO | None = None, stdout: TextIO | None = None):
    """Start the --control transport; None for "none"."""
    if spec == "none":
        return None
    if spec == "stdin":
        return StdioControl(engine, stdin, stdout)
    kind, _, port = spec.partition(":")
    if kind in ("tcp", "ws") and port.isdigit():
        if kind == "tcp":
            return TcpControl(engine, int(port))
        from .websocket import WebSocketControl
        return WebSocketControl(engine, int(port))
    raise FlowError(f"--control {spec!r}: use {CONTROL_HELP}")
