"""The control protocol over OSC (UDP, python-osc), for Max/MSP, Pure Data, SuperCollider, TouchDesigner.

Every OSC message under /cf becomes the command dict the JSON protocol would send and goes through
engine.submit (state.apply_message), so OSC accepts and refuses exactly what JSON does:
    /cf/temperature 0.8   /cf/set/temperature 0.8   ->  {"temperature": 0.8}
    /cf/add/temperature -0.1                        ->  {"add": {"temperature": -0.1}}
    /cf/token_scale f f f f f f f f  (or one f)     ->  {"token_scale": [8 numbers]}  (one number: every element)
    /cf/channel_bias/12 0.2  (/cf/add/... nudges)   ->  {"channel_bias": {"index": 12, "value": 0.2}}
    /cf/seed 123 [crossfade|cut]  /cf/seed random   ->  {"seed": 123, "mode": ...}
    /cf/reset steering|lfos|all   /cf/get [state|info]   /cf/help   /cf/quit   /cf/json '{"set": {...}}'
    /cf/lfo/ID target temperature depth 0.3 rate 8  ->  {"lfo": {"id": ID, "target": ..., "depth": ..., "rate": ...}}
    /cf/lfo/ID/depth 0.3   /cf/lfo/ID/on 0          ->  {"lfo": {"id": ID, "depth": 0.3}}, ... "on": false
    /cf/lfo/ID/remove                               ->  {"lfo": {"id": ID, "remove": true}}
    /cf/preset/save NAME   /cf/preset/delete NAME   ->  {"preset": {"save": NAME}}, ...
    /cf/preset/recall NAME [MORPH_CHUNKS]           ->  {"preset": {"recall": NAME, "morph_chunks": N}}
    /cf/randomise tokens|channels|both [SPREAD]     ->  {"randomise": {"what": ..., "spread": ...}}
    /cf/events/waveform 1  (latents, max_rate_hz)   ->  {"events": {"waveform": true}}
Replies go to the sender (or to its host at --osc-reply-port): /cf/ok ADDRESS, /cf/error MESSAGE ADDRESS,
/cf/state JSON, /cf/ready JSON (to /cf/get info, and to everyone at the start), /cf/help LINE (one per
address form); every client heard from in the last idle_s gets /cf/chunk index rtf buffer_s underruns per
chunk, /cf/cycled index seed, /cf/recovered index outcome retries, the opt-in /cf/waveform index v1..v128
(each point's peak, both channels) and /cf/latents index v1..v512 (8 x 64, row by row), and
/cf/end chunks rtf underruns at the end.
UDP has no connections and OSC no authentication: the port listens on 127.0.0.1 unless the user names
another interface. Replies and events leave through one bounded queue and one sender thread, so a
client that vanishes costs at most a full queue (events dropped, counted), never the engine's time.
"""
from __future__ import annotations

import ipaddress
import json
import queue
import socket
import threading
import time

import numpy as np
from pythonosc.osc_message_builder import BuildError, build_msg
from pythonosc.osc_packet import OscPacket, ParseError

from ..errors import FlowError
from .protocol import ConnectionLimits, handle_line, handle_message
from .modulation import LFO_KEYS
from .state import GET_WHAT, INTEGERS as INTEGER_CONTROLS, SETTABLE, VECTORS, ControlError

PREFIX = "/cf"
CONTROLS = SETTABLE
INTEGERS = (*INTEGER_CONTROLS, "seed")  # Pd and many controllers send only floats: 4.0 means 4 here
BUTTONS = {"help": {"help": True}, "quit": {"quit": True}, "get": {"get": "state"}}
PRESET_VERBS = ("save", "recall", "delete")
EVENT_OPTIONS = ("waveform", "latents", "max_rate_hz")
OSC_HELP = (
    "/cf/NAME VALUE or /cf/set/NAME VALUE: set a control (" + ", ".join(CONTROLS) + ")",
    "/cf/add/NAME DELTA: nudge a numeric control, clamped to its range",
    "/cf/token_scale 8 numbers (or one for all); /cf/token_scale/3 0.5: one element; the same for "
    "token_bias and channel_scale, channel_bias (64, index 0..63); /cf/add/channel_bias/12 0.1 nudges one",
    "/cf/seed 123 [crossfade|cut]; /cf/seed random [crossfade|cut]",
    "/cf/reset steering|lfos|all; /cf/get [state|info]; /cf/help; /cf/quit",
    "/cf/lfo/ID FIELD VALUE ... (fields: " + ", ".join(k for k in LFO_KEYS if k not in ("id", "remove")) + "), "
    "e.g. /cf/lfo/wobble target temperature shape sine rate 8 unit chunks depth 0.3; /cf/lfo/ID/FIELD VALUE; "
    "/cf/lfo/ID/remove",
    "/cf/preset/save NAME; /cf/preset/recall NAME [MORPH_CHUNKS]; /cf/preset/delete NAME",
    "/cf/randomise tokens|channels|both [SPREAD]; /cf/gain 0.8; /cf/auto_cycle 32; /cf/crossfade_chunks 4",
    "/cf/events/waveform 1|0; /cf/events/latents 1|0; /cf/events/max_rate_hz 10",
    "/cf/json '{\"set\": {\"temperature\": 0.8, \"solver\": \"heun\"}}': any JSON command, applied all at once",
    "replies: /cf/ok ADDRESS, /cf/error MESSAGE ADDRESS, /cf/state JSON, /cf/ready JSON; "
    "per chunk: /cf/chunk index rtf buffer_s underruns (and /cf/cycled, /cf/recovered, /cf/waveform, /cf/latents); "
    "at the end: /cf/end chunks rtf underruns",
)


def osc_command(address: str, args: list) -> dict | str | None:
    """The JSON command an OSC message stands for (a str: /cf/json's line, to parse as the JSON protocol does);
    None for a button's release (a 0 sent to a trigger).

    Only the transport's forms are checked here (address shape, argument count); values are left
    to apply_message, which names what is wrong with them."""
    parts = address.split("/")[1:]  # "/cf/add/x/3" -> ["cf", "add", "x", "3"]
    if len(parts) < 2 or parts[0] != PREFIX[1:]:
        raise ControlError(f"unknown OSC address {address!r}: commands live under {PREFIX}/, e.g. "
                           f"{PREFIX}/temperature 0.8 (send {PREFIX}/help for the list)")
    head, rest = parts[1], parts[2:]
    args = [_value(a) for a in args]
    if head in BUTTONS and not rest:
        if head == "get" and len(args) == 1 and args[0] in GET_WHAT:
            return {"get": args[0]}
        if head == "get" and not args:
            return BUTTONS[head]
        if not args or (len(args) == 1 and args[0] in (1, True)):
            return BUTTONS[head]
        if len(args) == 1 and args[0] in (0, False):
            return None
        raise ControlError(f"{address} takes no argument (or 1, as a button sends), got {_count(args)}")
    if head == "json" and not rest:
        if len(args) != 1 or not isinstance(args[0], str):
            raise ControlError(f"{address} takes one string: a JSON command such as "
                               f'{{"set": {{"temperature": 0.8}}}}')
        return args[0]
    if head == "reset" and not rest:
        return {"reset": _one(address, args)}
    if head == "lfo":
        return {"lfo": _lfo(address, rest, args)}
    if head == "preset" and len(rest) == 1 and rest[0] in PRESET_VERBS:
        if rest[0] == "recall" and len(args) == 2:
            return {"preset": {"recall": args[0], "morph_chunks": _integral(args[1])}}
        return {"preset": {rest[0]: _one(address, args)}}
    if head == "randomise" and not rest:
        if len(args) not in (1, 2):
            raise ControlError(f"{address} takes tokens, channels or both, and optionally a spread, got {_count(args)}")
        return {"randomise": {"what": args[0], **({"spread": args[1]} if len(args) == 2 else {})}}
    if head == "events" and len(rest) == 1 and rest[0] in EVENT_OPTIONS:
        value = _one(address, args)
        return {"events": {rest[0]: value if rest[0] == "max_rate_hz" else _flag(value)}}
    if head == "seed" and not rest:
        if len(args) not in (1, 2):
            raise ControlError(f"{address} takes a seed (or random) and optionally crossfade or cut, "
                               f"got {_count(args)}")
        return {"seed": _integral(args[0]), **({"mode": args[1]} if len(args) == 2 else {})}
    verb = "set"
    if head in ("set", "add"):
        verb = head
        if not rest:
            raise ControlError(f"{address}: name the control, e.g. {PREFIX}/{head}/temperature")
        head, rest = rest[0], rest[1:]
    if head not in CONTROLS:
        raise ControlError(f"unknown OSC address {address!r}: use {PREFIX}/NAME, {PREFIX}/set/NAME or "
                           f"{PREFIX}/add/NAME with a control ({', '.join(CONTROLS)}), or {PREFIX}/seed, reset, get, "
                           f"help, quit, json")
    if len(rest) > 1:
        raise ControlError(f"unknown OSC address {address!r}: at most one index follows a control name")
    if rest:  # one element of a vector: /cf/channel_bias/12 0.2
        index = int(rest[0]) if rest[0].isdigit() else rest[0]  # not a number: apply_message says so
        if head not in VECTORS:
            raise ControlError(f"{address}: only {', '.join(VECTORS)} take an index")
        value = {"index": index, "value": _one(address, args)}
    elif head in VECTORS and len(args) > 1:
        value = list(args)
    else:
        value = _one(address, args)
        if head in INTEGERS:
            value = _integral(value)
    return {verb: {head: value}}


def _lfo(address: str, rest: list[str], args: list) -> dict:
    """/cf/lfo/ID FIELD VALUE ..., /cf/lfo/ID/FIELD VALUE or /cf/lfo/ID/remove as one LFO message."""
    if not rest or len(rest) > 2:
        raise ControlError(f"{address}: use {PREFIX}/lfo/ID FIELD VALUE ..., {PREFIX}/lfo/ID/FIELD VALUE or "
                           f"{PREFIX}/lfo/ID/remove")
    spec: dict = {"id": rest[0]}
    if len(rest) == 2 and rest[1] == "remove":
        if args not in ([], [1], [True]):
            raise ControlError(f"{address} takes no argument (or 1, as a button sends), got {_count(args)}")
        return {**spec, "remove": True}
    if len(rest) == 2:
        pairs = [(rest[1], _one(address, args))]
    else:
        if not args or len(args) % 2:
            raise ControlError(f"{address} takes FIELD VALUE pairs, e.g. target temperature depth 0.3, "
                               f"got {_count(args)}")
        pairs = list(zip(args[::2], args[1::2]))
    for name, value in pairs:
        if name not in LFO_KEYS or name in ("id", "remove"):
            raise ControlError(f"{address}: unknown LFO field {name!r}; fields: "
                               f"{', '.join(k for k in LFO_KEYS if k not in ('id', 'remove'))}")
        spec[name] = _flag(value) if name == "on" else _integral(value) if name in ("index", "seed") else value
    return spec


def _flag(v):
    """A toggle's 1/0 (or true/false) as JSON's true/false; anything else is left for apply_message to refuse."""
    return bool(v) if v in (0, 1) and not isinstance(v, str) else v


def handle_osc(engine, address: str, args: list) -> list[tuple[str, list]]:
    """Apply one OSC message to the engine; the OSC replies for the client that sent it."""
    try:
        command = osc_command(address, args)
        if isinstance(command, str):
            events = handle_line(engine, command)  # the JSON protocol's own parsing and limits
        else:
            events = [] if command is None else handle_message(engine, command)
    except ControlError as exc:
        events = [{"event": "error", "message": str(exc)}]
    return [m for e in events for m in event_messages(e, address)]


def event_messages(event: dict, address: str = "") -> list[tuple[str, list]]:
    """One protocol event as OSC messages (address, arguments)."""
    kind = event["event"]
    if kind == "ok":
        return [(f"{PREFIX}/ok", [address])]
    if kind == "error":
        return [(f"{PREFIX}/error", [event["message"], address])]
    if kind == "state":
        return [(f"{PREFIX}/state", [json.dumps(event["state"], separators=(",", ":"))])]
    if kind == "help":
        return [(f"{PREFIX}/help", [line]) for line in OSC_HELP]
    if kind == "ready":
        return [(f"{PREFIX}/ready", [json.dumps({k: v for k, v in event.items() if k != "event"},
                                                separators=(",", ":"))])]
    if kind == "chunk":
        return [(f"{PREFIX}/chunk", [event["index"], event["rtf"], event["buffer_s"], event["underruns"]])]
    if kind == "seed":
        return [(f"{PREFIX}/cycled", [event["index"], event["seed"]])]
    if kind == "recovered":
        return [(f"{PREFIX}/recovered", [event["index"], event["outcome"], event["retries"]])]
    if kind == "waveform":
        lo, hi = event["min"], event["max"]  # (2, points) each
        return [(f"{PREFIX}/waveform", [event["index"], *(max(-a, b, -c, d) for a, b, c, d in
                                                          zip(lo[0], hi[0], lo[1], hi[1]))])]
    if kind == "latents":
        return [(f"{PREFIX}/latents", [event["index"], *(v for row in event["grid"] for v in row)])]
    if kind == "end":
        return [(f"{PREFIX}/end", [event["chunks"], event["rtf"], event["underruns"]])]
    return []


def _value(v):
    """OSC's 32-bit floats back to the decimal that was meant: 0.8 arrives as 0.800000011920929."""
    if isinstance(v, float) and np.isfinite(v) and float(np.float32(v)) == v:
        return float(str(np.float32(v)))
    return v


def _integral(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _one(address: str, args: list):
    if len(args) != 1:
        raise ControlError(f"{address} takes one value, got {_count(args)}")
    return args[0]


def _count(args: list) -> str:
    return f"{len(args)} argument{'s' * (len(args) != 1)}"


def exposed(host: str) -> bool:
    """True when host is not a loopback address: other machines can reach the port."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name: it may resolve to a network interface


def exposure_warning(host: str, port: int) -> str:
    return (f"warning: OSC has no authentication: anyone who can reach {host}:{port} can steer the stream and "
            f"stop it, and receives its events; use it only on a network you trust")


class OscControl:
    """OSC over UDP on host:port (127.0.0.1 unless told otherwise; port 0 picks a free one, see .port)."""

    def __init__(self, engine, port: int, host: str = "127.0.0.1", reply_port: int | None = None,
                 limits: ConnectionLimits = ConnectionLimits(), capacity: int = 256):
        for what, p in (("--control osc", port), ("--osc-reply-port", reply_port)):
            if p is not None and not 0 <= p <= 65535:
                raise FlowError(f"{what}: a port is 0..65535 (0 picks a free one), got {p}")
        if reply_port == 0:
            raise FlowError("--osc-reply-port: name the port your OSC client listens on (1..65535)")
        self.engine, self.limits, self.reply_port = engine, limits, reply_port
        self._clients: dict[tuple, float] = {}  # reply address -> when it was last heard from
        self._lock, self._closed = threading.Lock(), threading.Event()
        self._out: queue.Queue = queue.Queue(capacity)
        self.dropped = 0
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.bind((host, port))
        except (OSError, OverflowError) as exc:
            self.sock.close()
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise FlowError(f"--control osc:{port}: cannot listen on {host}:{port} ({why}); "
                            f"pick another port or --osc-host") from None
        self.sock.settimeout(0.1)  # how often the receiver looks at _closed
        self.host, self.port = self.sock.getsockname()[:2]
        engine.subscribe(self._broadcast)
        self._threads = [threading.Thread(target=self._receive, name="realtime-osc", daemon=True),
                         threading.Thread(target=self._send, name="realtime-osc-send", daemon=True)]
        for t in self._threads:
            t.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data, sender = self.sock.recvfrom(65536)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:  # closed, or an ICMP error about an earlier reply
                continue
            to = sender if self.reply_port is None else (sender[0], self.reply_port, *sender[2:])
            if not self._admit(to):
                self._queue(to, f"{PREFIX}/error", [f"too many OSC clients ({self.limits.max_clients} at most); "
                                                    f"others are dropped after {self.limits.idle_s:g} s of silence",
                                                    ""])
                continue
            try:
                messages = [timed.message for timed in OscPacket(data).messages]
            except ParseError:
                self._queue(to, f"{PREFIX}/error", ["not an OSC message or bundle", ""])
                continue
            for m in messages:  # a bundle's messages apply one by one (its time tag is not waited for)
                for address, args in handle_osc(self.engine, m.address, m.params):
                    self._queue(to, address, args)

    def _admit(self, client: tuple) -> bool:
        """Remember who to send events to: at most max_clients heard from in the last idle_s."""
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            if client not in self._clients and len(self._clients) >= self.limits.max_clients:
                return False
            self._clients[client] = now
            return True

    def _expire(self, now: float) -> None:
        for c in [c for c, seen in self._clients.items() if now - seen > self.limits.idle_s]:
            del self._clients[c]

    def _broadcast(self, event: dict) -> None:
        if self._closed.is_set():
            return
        with self._lock:
            self._expire(time.monotonic())
            clients = list(self._clients)
        for address, args in event_messages(event):
            for c in clients:
                self._queue(c, address, args)

    def _queue(self, to: tuple, address: str, args: list) -> None:
        try:
            dgram = build_msg(address, args).dgram
        except BuildError:  # a value OSC cannot carry: say so rather than drop the reply
            dgram = build_msg(f"{PREFIX}/error", [f"reply to {address} could not be encoded", address]).dgram
        try:
            self._out.put_nowait((dgram, to))
        except queue.Full:
            self.dropped += 1

    def _send(self) -> None:
        while True:
            item = self._out.get()
            if item is None:
                break
            try:
                self.sock.sendto(*item)
            except OSError:  # the client's port is gone; UDP does not care, neither do we
                pass

    def close(self, flush_timeout: float = 1.0) -> None:
        """Send what is queued (up to flush_timeout), then stop."""
        self._closed.set()
        try:
            self._out.put(None, timeout=flush_timeout)
        except queue.Full:
            pass
        for t in self._threads:
            t.join(flush_timeout)
        self.sock.close()
