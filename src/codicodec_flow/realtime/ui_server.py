"""The browser control surface (`realtime --ui PORT`): a page shipped in the package, served with its WebSocket.

One port serves both: plain HTTP GET of the page's three files (ui/index.html at /, ui/app.js,
ui/style.css; anything else 404, no listing, other methods 405, or closed unanswered by websockets
before 17) and the JSON protocol as a WebSocket at /ws (websocket.py: the same origin policy, limits
and events as --control ws:PORT). The page is
plain HTML/JS/CSS with nothing fetched from elsewhere, so it works offline; it builds its controls
from the engine's own reference ({"help": true}) and state, so a new control shows up without
editing it. Its origin, http://127.0.0.1:PORT, is one of this machine's and so accepted; other
sites' pages are refused as on any ws: port.
"""
from __future__ import annotations

from importlib import resources

from .protocol import ConnectionLimits
from .websocket import StaticFile, WebSocketControl

FILES = {"/index.html": "text/html; charset=utf-8", "/app.js": "text/javascript; charset=utf-8",
         "/style.css": "text/css; charset=utf-8"}


def load_pages() -> dict[str, StaticFile]:
    """The page's files from the installed package (read once, at start)."""
    folder = resources.files(__package__) / "ui"
    return {path: StaticFile((folder / path[1:]).read_bytes(), kind) for path, kind in FILES.items()}


def exposure_warning(host: str, port: int) -> str:
    return (f"warning: the control page has no password: anyone who can reach {host}:{port} can open it, steer the "
            f"stream and stop it; use it only on a network you trust")


class UiServer(WebSocketControl):
    """The page and its WebSocket on http://HOST:PORT (127.0.0.1 unless told otherwise; 0 picks a free port)."""

    def __init__(self, engine, port: int, host: str = "127.0.0.1", allow_origins: tuple[str, ...] = (),
                 limits: ConnectionLimits = ConnectionLimits()):
        super().__init__(engine, port, allow_origins, limits, host, load_pages(), flag=f"--ui {port}")

    @property
    def url(self) -> str:
        """Where to open the page on this machine."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"
