"""The JSON control protocol over a WebSocket on 127.0.0.1, for web pages; standard library only.

A minimal RFC 6455 server: the HTTP upgrade handshake, masked client frames (text, continuation,
ping, close), unmasked text frames back. Each text message carries one or more JSON command
lines; every event goes out as one text message.

Who may connect. A browser lets any web site open a WebSocket to 127.0.0.1 and tells the server
which site it came from in the Origin header, which pages cannot forge. Accepted: pages served by
this machine (http or https on localhost, 127.0.0.0/8 or [::1], any port), the origins the user
names with --allow-origin, and handshakes without an Origin (programs, not browsers: browsers always
send one). Refused: every other site, and `Origin: null`, which browsers send for sandboxed frames
and data: URLs of any site as well as for file:// pages, so it cannot tell a local page from a
hostile one (serve a local page over http://localhost instead).
"""
from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import socketserver
import struct
import threading
import time
from urllib.parse import urlsplit

from .protocol import MAX_LINE, Client, ConnectionLimits, LocalControl

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # fixed by RFC 6455
_DEFAULT_PORTS = {"http": 80, "https": 443}
_HEAD_END = re.compile(rb"\r?\n\r?\n")
TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


class _Closed(Exception):
    pass


class _Refused(Exception):
    def __init__(self, status: str, text: str):
        super().__init__(text)
        self.status, self.text = status, text


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()


def normalise_origin(text: str) -> str:
    """An origin as a browser sends it, `scheme://host[:port]` (lower case, no default port); ValueError if `text`
    is not one. `null` and file:// are refused: they do not name a site (see the module docstring)."""
    text = text.strip()
    if text.lower() == "null" or text.lower().startswith(("file:", "data:")):
        raise ValueError(f"{text!r} is what sandboxed frames, data: URLs and file:// pages of any site send; "
                         f"it cannot be allowed (serve the page over http://localhost instead)")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r} is not an origin like https://example.com:8443") from None
    if not parts.scheme or not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment \
            or parts.username is not None:
        raise ValueError(f"{text!r} is not an origin: give scheme://host[:port] only, like https://example.com:8443")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    scheme = parts.scheme.lower()
    shown_port = "" if port is None or port == _DEFAULT_PORTS.get(scheme) else f":{port}"
    return f"{scheme}://{host}{shown_port}"


def loopback_origin(origin: str) -> bool:
    """A page served over http(s) by this machine: localhost, 127.0.0.0/8 or [::1], on any port."""
    try:
        parts = urlsplit(origin)
        host = parts.hostname
    except ValueError:
        return False
    if parts.scheme.lower() not in _DEFAULT_PORTS or not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def origin_allowed(origin: str | None, allowed: frozenset[str] = frozenset()) -> bool:
    """Whether a handshake with this Origin header (None: none sent) may steer the stream."""
    if origin is None:
        return True  # not a browser: browsers always send Origin with a WebSocket handshake
    if loopback_origin(origin):
        return True
    try:
        return normalise_origin(origin) in allowed
    except ValueError:
        return False


def frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked, final server frame."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([n])
    elif n < 1 << 16:
        head += bytes([126]) + struct.pack(">H", n)
    else:
        head += bytes([127]) + struct.pack(">Q", n)
    return head + payload


def http_response(status: str, text: str) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(text)}\r\n"
            f"Connection: close\r\n\r\n{text}").encode()


class _Handler(socketserver.StreamRequestHandler):
    @staticmethod
    def refusal(text: str) -> bytes:
        return http_response("503 Service Unavailable", text)

    def handle(self) -> None:
        self._lock, self._rest = threading.Lock(), b""
        control = self.server.control
        if not self._handshake(control):
            return
        self.request.settimeout(control.limits.idle_s)  # also bounds a send to a client that stopped reading
        client = Client(lambda text: self._send(TEXT, text.rstrip("\n").encode()))
        try:
            control.hub.serve(client, self._lines())
        except TimeoutError:
            client.send({"event": "error", "message": control.limits.idle_message()})
            client.close()
            self._send(CLOSE, struct.pack(">H", 1000))
        except (OSError, _Closed):
            pass
        finally:
            client.close()

    def _send(self, opcode: int, payload: bytes) -> None:
        with self._lock:  # the client's writer thread and this handler's pongs share the socket
            self.request.sendall(frame(opcode, payload))

    def _handshake(self, control: "WebSocketControl") -> bool:
        try:
            headers = self._read_head(control.limits)
            key = headers.get("sec-websocket-key")
            if headers[""][:4] != "GET " or headers.get("upgrade", "").lower() != "websocket" or not key:
                raise _Refused("426 Upgrade Required", "this port speaks WebSocket (ws://127.0.0.1:PORT)")
            if not origin_allowed(headers.get("origin"), control.origins):
                raise _Refused("403 Forbidden", "only pages served from this machine, or origins given with "
                                                "--allow-origin, may connect")
        except _Refused as refused:
            self.request.sendall(http_response(refused.status, refused.text))
            return False
        except (OSError, _Closed):  # the peer went away (or sent nothing in time: _read_head says so first)
            return False
        self.request.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                              f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n").encode())
        return True

    def _read_head(self, limits: ConnectionLimits) -> dict[str, str]:
        """The upgrade request's headers by lower-case name ("" holds the request line), read within the limits
        on time, bytes and lines; bytes after it (an eager client's first frames) are kept for _read."""
        deadline, buf = time.monotonic() + limits.handshake_s, b""
        while not (end := _HEAD_END.search(buf)):
            if len(buf) > limits.handshake_bytes:
                raise _Refused("431 Request Header Fields Too Large",
                               f"the handshake may be at most {limits.handshake_bytes} bytes")
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Refused("408 Request Timeout", f"the handshake must arrive within {limits.handshake_s:g} s")
            self.request.settimeout(left)
            try:
                data = self.request.recv(4096)
            except TimeoutError:
                continue  # the deadline check above answers
            if not data:
                raise _Closed
            buf += data
        if end.start() > limits.handshake_bytes:
            raise _Refused("431 Request Header Fields Too Large",
                           f"the handshake may be at most {limits.handshake_bytes} bytes")
        lines = buf[:end.start()].decode("latin-1").splitlines()
        self._rest = buf[end.end():]
        if len(lines) - 1 > limits.handshake_headers:
            raise _Refused("431 Request Header Fields Too Large",
                           f"the handshake may have at most {limits.handshake_headers} header lines")
        headers = {"": lines[0] if lines else ""}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return headers

    def _read(self, n: int) -> bytes:
        data, self._rest = self._rest[:n], self._rest[n:]
        if len(data) < n:
            data += self.rfile.read(n - len(data))
        if len(data) < n:
            raise _Closed
        return data

    def _messages(self):
        """Whole text messages, reassembled from fragments; pings answered; a close ends them."""
        parts: list[bytes] = []
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if not b1 & 0x80:  # clients must mask (RFC 6455 5.1)
                self._send(CLOSE, struct.pack(">H", 1002))
                return
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            if n + sum(map(len, parts)) > MAX_LINE:
                self._send(CLOSE, struct.pack(">H", 1009))  # message too big
                return
            mask = self._read(4)
            payload = bytes(c ^ mask[i % 4] for i, c in enumerate(self._read(n)))
            if opcode == CLOSE:
                self._send(CLOSE, payload[:2])
                return
            if opcode == PING:  # like any frame, it keeps the connection from counting as idle
                self._send(PONG, payload)
            elif opcode in (TEXT, BINARY, CONT):
                parts.append(payload)
                if b0 & 0x80:  # FIN: the message is complete
                    yield b"".join(parts).decode("utf-8", "replace")
                    parts = []

    def _lines(self):
        for message in self._messages():
            yield from message.splitlines() or [""]


class WebSocketControl(LocalControl):
    """The protocol on ws://127.0.0.1:PORT, one command per message; see the module docstring for who may connect.

    allow_origins: web origins accepted besides this machine's own pages (normalised; ValueError if one is not
    an origin or is `null`)."""

    def __init__(self, engine, port: int, allow_origins: tuple[str, ...] = (),
                 limits: ConnectionLimits = ConnectionLimits()):
        self.origins = frozenset(normalise_origin(o) for o in allow_origins)
        super().__init__(engine, port, _Handler, "ws", limits)
