"""The JSON control protocol over a WebSocket on 127.0.0.1, for web pages; standard library only.

A minimal RFC 6455 server: the HTTP upgrade handshake, masked client frames (text, continuation,
ping, close), unmasked text frames back. Each text message carries one or more JSON command
lines; every event goes out as one text message. A browser lets any web site open a WebSocket to
127.0.0.1, so connections are accepted only from pages served by this machine (an Origin of
localhost, 127.0.0.1, [::1], file:// or none, which is what non-browser clients send).
"""
from __future__ import annotations

import base64
import hashlib
import socketserver
import struct
import threading
from urllib.parse import urlsplit

from .protocol import MAX_LINE, Client, LocalControl

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # fixed by RFC 6455
_LOCAL = {"localhost", "127.0.0.1", "::1"}
TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


class _Closed(Exception):
    pass


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()


def local_origin(origin: str | None) -> bool:
    if origin is None or origin == "null" or origin.startswith("file://"):
        return True
    return urlsplit(origin).hostname in _LOCAL


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


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self._lock = threading.Lock()
        if not self._handshake():
            return
        client = Client(lambda text: self._send(TEXT, text.rstrip("\n").encode()))
        try:
            self.server.hub.serve(client, self._lines())
        except (OSError, _Closed):
            pass
        finally:
            client.close()

    def _send(self, opcode: int, payload: bytes) -> None:
        with self._lock:  # the client's writer thread and this handler's pongs share the socket
            self.request.sendall(frame(opcode, payload))

    def _handshake(self) -> bool:
        headers = {}
        request = self.rfile.readline(4096).decode("latin-1")
        while True:
            line = self.rfile.readline(4096).decode("latin-1").strip()
            if not line:
                break
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        key = headers.get("sec-websocket-key")
        if not request.startswith("GET ") or headers.get("upgrade", "").lower() != "websocket" or not key:
            self._refuse("426 Upgrade Required", "this port speaks WebSocket (ws://127.0.0.1:PORT)")
            return False
        if not local_origin(headers.get("origin")):
            self._refuse("403 Forbidden", "only pages served from this machine may connect")
            return False
        self.request.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                              f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n").encode())
        return True

    def _refuse(self, status: str, text: str) -> None:
        self.request.sendall(f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(text)}\r\n"
                             f"Connection: close\r\n\r\n{text}".encode())

    def _read(self, n: int) -> bytes:
        data = self.rfile.read(n)
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
            if opcode == PING:
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
    """The protocol on ws://127.0.0.1:PORT, one command per message."""

    def __init__(self, engine, port: int):
        super().__init__(engine, port, _Handler, "ws")
