"""The JSON control protocol over a WebSocket, for web pages, on the `websockets` library's threaded server.

Each text (or binary, read as UTF-8) message carries one or more JSON command lines; every event goes
out as one text message. The port can also serve a few static files over plain HTTP GET (ui_server.py
puts the browser control surface there, the WebSocket then at /ws).

Who may connect. A browser lets any web site open a WebSocket to 127.0.0.1 and tells the server
which site it came from in the Origin header, which pages cannot forge. Accepted: pages served by
this machine (http or https on localhost, 127.0.0.0/8 or [::1], any port), the origins the user
names with --allow-origin, and handshakes without an Origin (programs, not browsers: browsers always
send one). Refused: every other site, and `Origin: null`, which browsers send for sandboxed frames
and data: URLs of any site as well as for file:// pages, so it cannot tell a local page from a
hostile one (serve a local page over http://localhost instead). A port bound to another interface
(ui_server.py's --ui-host) also accepts a page whose origin is that port at the IP address the
request came to (`http://192.168.1.5:PORT` with `Host: 192.168.1.5:PORT`): an IP address, unlike a
name, cannot be re-pointed at this machine by someone else's DNS.

Limits (protocol.ConnectionLimits): at most max_clients connections at once, handshakes and page
loads included (one more is answered 503); the upgrade request must arrive within handshake_s (else
408) and have at most handshake_bytes and handshake_headers (else 431; websockets itself refuses a
line over 8 KiB or more than 128 headers before that); a connection that sends nothing (no message,
no ping) for idle_s is told why and closed; a message over MAX_LINE closes it with code 1009. Events
reach each client through its own bounded queue (protocol.Client), so a page that stops reading loses
events and never slows the engine; its blocked send also holds back its frames, so it is dropped once
idle_s passes (the send aborted) and its thread and slot are free again.
"""
from __future__ import annotations

import contextlib
import functools
import http
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.sync.server import ServerConnection, serve

from ..errors import FlowError
from .protocol import MAX_LINE, Client, ConnectionLimits, Hub

_DEFAULT_PORTS = {"http": 80, "https": 443}
WS_PATH = "/ws"  # where the WebSocket is on a port that also serves pages


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


def same_address_origin(origin: str | None, host_header: str | None, port: int) -> bool:
    """A page this port served at an IP address: Origin `http://IP:port` where the request's Host is that IP:port."""
    if origin is None or host_header is None:
        return False
    try:
        page, asked = urlsplit(origin), urlsplit(f"http://{host_header}")
        ipaddress.ip_address(page.hostname or "")
        return page.scheme.lower() == "http" and page.port == asked.port == port and page.hostname == asked.hostname
    except ValueError:
        return False


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str


# what every served file carries: no caching (a new version of the package shows at once), no framing by other
# sites (clickjacking), scripts, styles and connections from this origin only, no referrer
STATIC_HEADERS = (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
                  ("Referrer-Policy", "no-referrer"),
                  ("Content-Security-Policy", "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
                                              "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"))


class _Connection(ServerConnection):
    """websockets' server connection, plus: when the client last sent a frame (any: a message, a ping), a way to
    abort a send that makes no progress, and a 408 answer to a handshake that does not arrive in time."""

    def __init__(self, sock, protocol, *args, limits: ConnectionLimits, release, **kwargs):
        super().__init__(sock, protocol, *args, **kwargs)  # args: the server, from websockets 16 on
        self.heard = time.monotonic()
        self.limits, self.release = limits, release  # release(): free this connection's slot

    def process_event(self, event) -> None:
        if isinstance(event, Frame):
            self.heard = time.monotonic()
        super().process_event(event)

    def abort(self) -> None:
        """Shut the socket down under a send blocked on a peer that stopped reading (the send then fails)."""
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)

    def handshake(self, *args, **kwargs) -> None:
        try:
            super().handshake(*args, **kwargs)
        except TimeoutError:
            self.release()  # before the answer, which waits (close_timeout) for the peer to close
            with contextlib.suppress(Exception):  # the peer may be gone already
                with self.send_context(expected_state=State.CONNECTING):
                    self.protocol.send_response(self.protocol.reject(
                        http.HTTPStatus.REQUEST_TIMEOUT,
                        f"the handshake must arrive within {self.limits.handshake_s:g} s\n"))
            raise


class WebSocketControl:
    """The protocol on ws://HOST:PORT (127.0.0.1 unless told otherwise; port 0 picks a free one, see .port); see the
    module docstring for who may connect.

    allow_origins: web origins accepted besides this machine's own pages (normalised; ValueError if one is not
    an origin or is `null`). pages: path -> StaticFile served over HTTP GET; with pages the WebSocket is at /ws."""

    def __init__(self, engine, port: int, allow_origins: tuple[str, ...] = (),
                 limits: ConnectionLimits = ConnectionLimits(), host: str = "127.0.0.1",
                 pages: dict[str, StaticFile] | None = None, flag: str | None = None):
        flag = flag or f"--control ws:{port}"  # how the user asked for this port, for errors
        if not 0 <= port <= 65535:
            raise FlowError(f"{flag}: a port is 0..65535 (0 picks a free one)")
        self.origins = frozenset(normalise_origin(o) for o in allow_origins)
        self.hub, self.limits, self.host, self.pages = Hub(engine), limits, host, pages
        self.active, self._count, self._local = 0, threading.Lock(), threading.local()
        try:
            self.server = serve(self._serve, host, port, process_request=self._check, compression=None,
                                open_timeout=limits.handshake_s, ping_interval=None, close_timeout=0.5,
                                max_size=MAX_LINE, create_connection=functools.partial(_Connection, limits=limits,
                                                                    release=self._release))
        except OSError as exc:
            raise FlowError(f"{flag}: cannot listen on {host}:{port} ({exc.strerror}); pick another "
                            f"port") from None
        self.port = self.server.socket.getsockname()[1]
        self.server.handler = self._counted(self.server.handler)  # the library's per-connection thread, counted
        self._thread = threading.Thread(target=self.server.serve_forever, name="realtime-ws", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()  # closes every connection (code 1001) and waits for their threads

    # ------------------------------------------------------------------ slots

    def _counted(self, handle):
        """handle(sock, addr) in a connection slot; the slot is free again before the socket closes (see _serve)."""
        def counted(sock, addr) -> None:
            with self._count:
                room = self.active < self.limits.max_clients
                self.active += int(room)
            self._local.slot = room
            try:
                handle(sock, addr)
            finally:
                self._release()
        return counted

    def _release(self) -> None:
        """Free this thread's slot, once."""
        if getattr(self._local, "slot", False):
            self._local.slot = False
            with self._count:
                self.active -= 1

    # ------------------------------------------------------------------ HTTP side

    def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        """websockets' process_request: answer a page, or refuse, or None to go on with the WebSocket handshake.
        An answer frees the slot at once: the library then waits (close_timeout) for the peer to close."""
        response = self._answer(connection, request)
        if response is not None:
            self._release()
        return response

    def _answer(self, connection: ServerConnection, request: Request) -> Response | None:
        refuse = connection.respond
        if not getattr(self._local, "slot", False):
            return refuse(http.HTTPStatus.SERVICE_UNAVAILABLE, f"too many control connections "
                          f"({self.limits.max_clients} at most); close one and connect again\n")
        lines = list(request.headers.raw_items())
        size = len(f"GET {request.path} HTTP/1.1\r\n\r\n") + sum(len(k) + len(v) + 4 for k, v in lines)
        if size > self.limits.handshake_bytes:
            return refuse(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                          f"the handshake may be at most {self.limits.handshake_bytes} bytes\n")
        if len(lines) > self.limits.handshake_headers:
            return refuse(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                          f"the handshake may have at most {self.limits.handshake_headers} header lines\n")
        if getattr(request, "method", "GET") != "GET":  # older websockets close on other methods themselves
            response = refuse(http.HTTPStatus.METHOD_NOT_ALLOWED, "only GET is served here\n")
            response.headers["Allow"] = "GET"
            return response
        path = request.path.split("?", 1)[0]
        upgrade = [u.lower() for u in request.headers.get_all("Upgrade")] == ["websocket"]
        if self.pages is not None and path != WS_PATH:
            page = self.pages.get("/index.html" if path == "/" else path)
            if page is None or upgrade:
                return refuse(http.HTTPStatus.NOT_FOUND, "not found\n")
            return self._page(page)
        if not upgrade:
            where = f"ws://{self.host}:{self.port}{WS_PATH if self.pages is not None else ''}"
            return refuse(http.HTTPStatus.UPGRADE_REQUIRED, f"this port speaks WebSocket ({where})\n")
        origins = request.headers.get_all("Origin")
        if len(origins) > 1:
            return refuse(http.HTTPStatus.BAD_REQUEST, "one Origin header at most\n")
        origin = origins[0] if origins else None
        if not (origin_allowed(origin, self.origins)
                or self.pages is not None and same_address_origin(origin, request.headers.get("Host"), self.port)):
            return refuse(http.HTTPStatus.FORBIDDEN, "only pages served from this machine, or origins given with "
                                                     "--allow-origin, may connect\n")
        return None

    @staticmethod
    def _page(page: StaticFile) -> Response:
        headers = Headers([("Content-Type", page.content_type), ("Content-Length", str(len(page.body))),
                           ("Connection", "close"), *STATIC_HEADERS])
        return Response(200, "OK", headers, page.body)

    # ------------------------------------------------------------------ WebSocket side

    def _serve(self, connection: _Connection) -> None:
        """One client, on the library's thread for the connection: commands in, replies and events out."""
        sending = threading.Event()  # set while the client's writer thread is inside a send

        def write(text: str) -> None:
            sending.set()
            try:
                connection.send(text.rstrip("\n"))
            except ConnectionClosed as exc:  # the writer thread stops on OSError
                raise OSError(str(exc)) from None
            finally:
                sending.clear()

        client = Client(write)
        try:
            self.hub.serve(client, self._lines(connection))
        except TimeoutError:  # also what a page that stopped reading comes to: its blocked send holds back its frames
            client.send({"event": "error", "message": self.limits.idle_message()})
        finally:
            client.close()  # sends what is queued (up to 1 s)
            if sending.is_set():  # still stuck: a peer that does not read would hold this thread (and its slot) for ever
                connection.abort()
            self._release()  # before the library closes the socket: a client that saw the end may connect at once

    def _lines(self, connection: _Connection):
        """The command lines of each message, until the client closes; TimeoutError after idle_s without a frame."""
        while True:
            left = connection.heard + self.limits.idle_s - time.monotonic()
            if left <= 0:
                raise TimeoutError
            try:
                message = connection.recv(timeout=left)
            except TimeoutError:
                continue  # a ping may have come meanwhile: the loop looks again
            except ConnectionClosed:
                return
            text = message if isinstance(message, str) else message.decode("utf-8", "replace")
            yield from text.splitlines() or [""]
