"""Line-delimited JSON control protocol, so a front end (a DAW bridge, a web page, Max/MSP) can drive a stream.

In: one JSON object per line, the commands of state.py, e.g.
    {"set": {"temperature": 0.8}}   {"seed": 123, "mode": "cut"}   {"channel_bias": {"index": 3, "value": 0.5}}
Out: one JSON object per line, each with an "event":
    {"event": "ok"}                                   a command was accepted; it applies from the next chunk
    {"event": "state", "state": {...}}                the answer to {"get": "state"}
    {"event": "ready", "sample_rate", "window", ...}  the model's facts: at the start, and the answer to {"get": "info"}
    {"event": "help", "commands": {...}, "reference": {...}}  the answer to {"help": true}: examples, and every
                                                      control's type, range and start value (state.describe)
    {"event": "error", "message": "..."}              a malformed message; nothing was changed
    {"event": "chunk", "index", "compute_s", "rtf", "buffer_s", "underruns", "latency_s", "state": {...}}
    {"event": "played", "index", "slot", "alignment_s"}  with an input: chunk `index` started sounding,
                                                      alignment_s after the performer started input chunk `slot`
    {"event": "late", "index", "slot", "late_s", "dropped", "lookahead", "suggested_lookahead"}  a lookahead
                                                      chunk missed its slot (cut to the grid, or dropped)
    {"event": "seed", "index", "seed", "reason"}      auto-cycling changed the seed
    {"event": "recovered", "index", "outcome", "retries", "reasons"}  a chunk went wrong and was redrawn or silenced
    {"event": "waveform", ...} / {"event": "latents", ...}  opt-in display events ({"events": {...}})
    {"event": "end", "chunks", "rtf", ...}            the session's summary
Transports: stdin/stdout, or a TCP port on 127.0.0.1 only (never reachable from another machine);
websocket.py adds a WebSocket port for web pages, osc.py OSC over UDP for music software (through
handle_message). Every client gets every chunk event; replies go to the client that asked.
A client that stops reading loses events, never stalls the stream.
A port serves at most ConnectionLimits.max_clients connections at once (more are refused with a
message), and closes a connection that sends nothing for idle_s (an empty line or a ping is enough).
"""
from __future__ import annotations

import json
import math
import queue
import socket
import socketserver
import sys
import threading
from dataclasses import dataclass
from typing import Callable, TextIO

from ..errors import FlowError
from .state import ControlError

CONTROL_HELP = ("none | stdin | tcp:PORT | ws:PORT | osc:PORT (ports listen on 127.0.0.1; osc: on --osc-host if "
                "given; 0 picks a free one)")

HELP = {
    "set": '{"set": {"temperature": 0.8, "solver": "heun", "nfe": 2, "cfg_scale": 1.5, "context_chunks": 8}}',
    "shorthand": '{"temperature": 0.8}  (any control name at the top level)',
    "add": '{"add": {"temperature": -0.1, "context_chunks": 1, "token_bias": {"index": 2, "value": 0.1}}}  (clamped)',
    "vectors": '{"token_scale": [8 numbers]}, {"channel_bias": {"index": 3, "value": 0.5}}, {"token_bias": 0.2}',
    "seed": '{"seed": 123, "mode": "crossfade"}  or  {"seed": "random", "mode": "cut"}',
    "controls": '{"gain": 0.8}  (0..2, limited at full scale), {"crossfade_chunks": 8}, {"auto_cycle": 32}  '
                '(a new seed every 32 chunks; 0 off)',
    "lfo": '{"lfo": {"id": "wobble", "target": "temperature", "shape": "sine", "rate": 8, "unit": "chunks", '
           '"depth": 0.3, "on": true}}  (a list sets several; {"lfo": {"id": "wobble", "remove": true}})',
    "preset": '{"preset": {"save": "verse"}}, {"preset": {"recall": "verse", "morph_chunks": 16}}, '
              '{"preset": {"delete": "verse"}}',
    "randomise": '{"randomise": {"what": "tokens", "spread": 0.5}}  (tokens | channels | both; optional "seed", '
                 '"morph_chunks")',
    "morph_chunks": '{"set": {"temperature": 1.5}, "morph_chunks": 8}  (glide what the message changes)',
    "events": '{"events": {"waveform": true, "latents": true, "max_rate_hz": 10}}',
    "reset": '{"reset": "steering"}  (scale/bias), {"reset": "lfos"}  or  {"reset": "all"}  (everything but the seed)',
    "get": '{"get": "state"}  or  {"get": "info"}  (the ready event again)', "quit": '{"quit": true}',
    "help": '{"help": true}',
    "midi_learn": '{"midi_learn": "temperature"}  (with --midi: the next knob moved drives it; "channel_bias/12" '
                  'one element, "channel_scale/0-31" a run; saved to --midi-map)',
}
MAX_LINE = 64 * 1024  # longer lines are refused rather than buffered without bound


@dataclass(frozen=True)
class ConnectionLimits:
    """What one control port accepts, so no client (or web page) can exhaust threads, memory or sockets."""
    max_clients: int = 16  # connections at once; one more is told so and closed
    idle_s: float = 600.0  # a connection that sends nothing for this long is closed (an empty line or a ping will do)
    handshake_s: float = 10.0  # WebSocket: the whole HTTP upgrade request must arrive within this ...
    handshake_bytes: int = 16 * 1024  # ... be at most this long ...
    handshake_headers: int = 64  # ... and have at most this many header lines

    def idle_message(self) -> str:
        return (f"closed: no message for {self.idle_s:g} s; send something (an empty line, a ping) at least that "
                f"often to stay connected")


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
    return handle_message(engine, msg)


def handle_message(engine, msg: object) -> list[dict]:
    """Apply one decoded command (from JSON, OSC, ...) to the engine; the events for the client that sent it."""
    try:
        upd = engine.submit(msg)
    except ControlError as exc:
        return [_error(str(exc))]
    replies: list[dict] = [{"event": "ok", **({"quit": True} if upd.quit else {})}]
    if upd.get == "state":
        replies.append({"event": "state", "state": engine.state()})
    elif upd.get == "info":
        replies.append(dict(engine.info))
    if upd.help:
        replies.append({"event": "help", "commands": HELP, "reference": engine.describe()})
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
    @staticmethod
    def refusal(text: str) -> bytes:
        """What a connection over the limit is told before it is closed."""
        return encode_event(_error(text)).encode()

    def handle(self) -> None:
        sock, limits = self.request, self.server.control.limits
        sock.settimeout(limits.idle_s)  # also bounds a send to a client that stopped reading

        def write(text: str) -> None:
            sock.sendall(text.encode())

        client = Client(write)
        try:
            self.server.control.hub.serve(client, (raw.decode("utf-8", "replace") for raw in iter(
                lambda: self.rfile.readline(MAX_LINE + 2), b"")))
        except TimeoutError:
            client.send(_error(limits.idle_message()))
        except OSError:
            pass
        finally:
            client.close()


class _Server(socketserver.ThreadingTCPServer):
    """One thread per connection, at most control.limits.max_clients of them; one more is refused at once."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, control: "LocalControl"):
        self.control, self.active, self._count = control, 0, threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        most = self.control.limits.max_clients
        with self._count:
            room = self.active < most
            if room:
                self.active += 1
        if not room:
            self._refuse(request, f"too many control connections ({most} at most); close one and connect again")
            return
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        """ThreadingMixIn's, with the slot freed before the socket closes: a client that saw its
        connection end may connect again at once (releasing after the close raced with it)."""
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._release()
            self.shutdown_request(request)

    def _release(self) -> None:
        with self._count:
            self.active -= 1

    def _refuse(self, request, text: str) -> None:
        """Say why and close, on the accepting thread (no thread is spent on a refused connection)."""
        try:
            request.settimeout(0.5)
            request.sendall(self.RequestHandlerClass.refusal(text))
            request.shutdown(socket.SHUT_WR)
            request.setblocking(False)
            while request.recv(65536):  # what already arrived, so closing does not reset the connection
                pass
        except OSError:
            pass
        finally:
            request.close()


class LocalControl:
    """A protocol server on 127.0.0.1 only (never another interface); port 0 picks a free one (see .port)."""

    def __init__(self, engine, port: int, handler: type[socketserver.BaseRequestHandler], scheme: str,
                 limits: ConnectionLimits = ConnectionLimits()):
        if not 0 <= port <= 65535:
            raise FlowError(f"--control {scheme}:{port}: a port is 0..65535 (0 picks a free one)")
        self.hub, self.limits = Hub(engine), limits
        try:
            self.server = _Server(("127.0.0.1", port), handler, self)
        except OSError as exc:
            raise FlowError(f"--control {scheme}:{port}: cannot listen on 127.0.0.1:{port} ({exc.strerror}); "
                            f"pick another port") from None
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"realtime-{scheme}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TcpControl(LocalControl):
    """Line-delimited JSON over plain TCP (e.g. `nc 127.0.0.1 PORT`)."""

    def __init__(self, engine, port: int, limits: ConnectionLimits = ConnectionLimits()):
        super().__init__(engine, port, _Handler, "tcp", limits)


def open_control(spec: str, engine, stdin: TextIO | None = None, stdout: TextIO | None = None,
                 allow_origins: tuple[str, ...] = (), osc_host: str = "127.0.0.1", osc_reply_port: int | None = None):
    """Start the --control transport; None for "none". allow_origins: web origins a ws: port accepts besides
    this machine's own pages; osc_host, osc_reply_port: where an osc: port listens and where it replies."""
    if spec == "none":
        return None
    if spec == "stdin":
        return StdioControl(engine, stdin, stdout)
    kind, _, port = spec.partition(":")
    if kind == "osc" and port.isdigit():
        from .osc import OscControl  # here, as osc.py builds on this module
        return OscControl(engine, int(port), osc_host, osc_reply_port)
    if kind in ("tcp", "ws") and port.isdigit():
        if kind == "tcp":
            return TcpControl(engine, int(port))
        from .websocket import WebSocketControl
        return WebSocketControl(engine, int(port), allow_origins)
    raise FlowError(f"--control {spec!r}: use {CONTROL_HELP}")
