#!/usr/bin/env python
"""Soak the live rig: `codicodec-flow realtime` at the speed of sound for N minutes, steered all the while from
every front end at once, with its memory, buffer and underruns recorded.

    python scripts/soak_live.py --minutes 20 --out soak/          # README: "Soaking the live rig"

It starts the realtime command as a subprocess (null sink paced in real time, OSC control, a virtual MIDI
port, the browser page) on a checkpoint of random weights (the small preset unless --ckpt or --model:
this measures the rig, not the music), and connects
    OSC      a python-osc client: temperature, LFOs set and changed, seed auto-cycling, preset saves and recalls
             with a morph; it also counts the replies and chunk events it gets back;
    MIDI     a mido output into the session's virtual port (ALSA's sequencer, else a JACK server on its dummy
             driver that this script starts): knobs of the built-in map (token and channel scales);
    browser  headless Chromium through selenium (Debian's chromium + chromium-driver): loads the page, moves its
             gain and crossfade sliders now and then, and is read back to check it keeps receiving events;
    monitor  a plain WebSocket client at the page's /ws: every chunk event (compute time, buffer, underruns) and
             the engine's state, against which every change above is checked.
Every --interval seconds it records the realtime process's resident memory, threads and open files (/proc), the
chunk count, underruns, buffer level and compute time, the page's chunk index and the load average. At the end it
quits the session and writes soak.json, soak.png (memory, buffer and compute time over time) and a verdict: the
memory slope over the second half (a least-squares line, MB per minute) against --max-slope (default 0.1 MB/min,
i.e. under 1 MB per 10 minutes), no underruns, the stream at real speed (chunks x 0.683 s within 2 % of the wall
time) and every front end connected with each change it made seen in the engine. Whatever goes wrong in a front
end is recorded with the time and the reason; the soak goes on. Exit status: 0 pass, 1 fail, 2 could not start.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

CHUNK_S = 32768 / 48000  # one chunk of audio
PRESETS_DIR = "presets"
VIRTUAL_PORT = "codicodec-flow"  # the port `realtime --midi virtual` opens (realtime.midi.VIRTUAL_NAME)


@dataclass
class FrontEnd:
    """What one front end did: connected or not (and why), changes made, changes seen in the engine, failures."""
    name: str
    connected: bool = False
    unavailable: str | None = None  # the system lacks what it needs (no browser, no MIDI system): the reason
    actions: int = 0
    verified: int = 0
    failures: list = field(default_factory=list)  # {"t", "what", "why"}
    counters: dict = field(default_factory=dict)

    def fail(self, t: float, what: str, why: str) -> None:
        self.failures.append({"t": round(t, 1), "what": what, "why": why[:500]})
        print(f"  [{t:7.1f} s] {self.name}: {what} FAILED: {why[:200]}", flush=True)


# ---------------------------------------------------------------------------------------------- the pieces

def make_checkpoint(path: Path, preset: str) -> Path:
    """A checkpoint of the `preset` model with random weights (every layer nudged off zero, so signal flows)."""
    import torch
    from codicodec_flow.checkpoint import inference_dict, save_checkpoint
    from codicodec_flow.config import MODEL_PRESETS, FlowConfig
    from codicodec_flow.latents import LatentStats
    from codicodec_flow.model import FlowDiT
    torch.manual_seed(0)
    cfg = MODEL_PRESETS[preset]
    model = FlowDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_checkpoint(inference_dict(model.state_dict(), cfg, FlowConfig(), LatentStats.identity(),
                                   {"name": "spectral", "version": "1"}, 0), path)
    return path


class MidiSystem:
    """Virtual MIDI ports: ALSA's sequencer if there is one, else a JACK server on its dummy driver started here
    (Debian: jackd2). `env` is what the realtime subprocess needs to use the same system; `error` why there is none."""

    def __init__(self):
        import mido
        self.mido, self.env, self.error, self._jackd = mido, {}, None, None
        try:
            mido.open_output("soak probe", virtual=True).close()
            return
        except (OSError, NotImplementedError, ImportError) as exc:
            why = f"no virtual MIDI ports ({str(exc).splitlines()[0]})"
        if shutil.which("jackd") is None:
            self.error = f"{why}, and no jackd to start a JACK server with (Debian: apt-get install jackd2)"
            return
        server = f"cf-soak-{os.getpid()}"
        self.env = {"JACK_DEFAULT_SERVER": server, "JACK_NO_AUDIO_RESERVATION": "1",
                    "MIDO_BACKEND": "mido.backends.rtmidi/UNIX_JACK"}
        os.environ.update(self.env)
        self._jackd = subprocess.Popen(["jackd", "-n", server, "-r", "-d", "dummy", "-r", "48000", "-p", "1024"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        mido.set_backend(self.env["MIDO_BACKEND"])
        deadline = time.monotonic() + 15
        time.sleep(1.0)  # the server's start-up, rather than a screenful of "cannot connect" from libjack
        while True:
            try:
                mido.open_output("soak probe", virtual=True).close()
                return
            except OSError as exc:
                if self._jackd.poll() is not None or time.monotonic() > deadline:
                    self.error = f"{why}, and a JACK server on the dummy driver did not start ({exc})"
                    self.close()
                    return
                time.sleep(0.2)

    def output(self, name: str):
        """An output into the session's virtual input, as a DAW would open it."""
        found = [n for n in self.mido.get_output_names() if name in n and "probe" not in n]
        if not found:
            raise RuntimeError(f"no MIDI output port named like {name!r} (ports: {self.mido.get_output_names()})")
        return self.mido.open_output(found[0])

    def close(self) -> None:
        if self._jackd is not None and self._jackd.poll() is None:
            self._jackd.terminate()
            try:
                self._jackd.wait(10)
            except subprocess.TimeoutExpired:
                self._jackd.kill()
                self._jackd.wait()


def proc_stats(pid: int) -> dict:
    """Resident memory (MB), threads and open files of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
    return {"rss_mb": round(rss, 2), "threads": threads, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def tree_pss_mb(root: int) -> float | None:
    """Proportional set size (MB) of a process and all its descendants (the browser's processes), or None."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            total += int(re.search(r"Pss:\s+(\d+) kB", Path(f"/proc/{pid}/smaps_rollup").read_text()).group(1))
        except (OSError, AttributeError):
            return None
    return round(total / 1024, 1)


class Realtime:
    """The realtime command as a subprocess; its output goes to a log file, read for its start-up lines."""

    def __init__(self, ckpt: Path, out: Path, midi: bool, env: dict):
        self.log = out / "realtime.log"
        self.cmd = [sys.executable, "-m", "codicodec_flow", "realtime", "--ckpt", str(ckpt), "--device", "cpu",
                    "--sink", "null", "--pace", "realtime", "--control", "osc:0", "--ui", "0", "--no-keys",
                    "--plain", "--presets", str(out / PRESETS_DIR)] + (["--midi", "virtual"] if midi else [])
        self._fh = open(self.log, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            if self.proc.poll() is not None:
                raise RuntimeError(f"realtime exited with {self.proc.returncode} before printing {pattern!r}:\n"
                                   f"{self.text()[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"realtime printed no {pattern!r} in {timeout:g} s:\n{self.text()[-3000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self._fh.close()
        return self.proc.returncode


class Monitor:
    """A WebSocket client at /ws: records every chunk event and answers state queries."""

    def __init__(self, port: int):
        from websockets.sync.client import connect
        self.ws = connect(f"ws://127.0.0.1:{port}/ws", max_size=None).__enter__()  # closed in close()
        self.chunks = {"t": [], "index": [], "compute_s": [], "buffer_s": [], "underruns": []}
        self.seeds, self.recovered, self.errors, self.end, self.ready = 0, [], [], None, None
        self._states: list[dict] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for text in self.ws:
                for line in str(text).splitlines():
                    self._event(json.loads(line), time.monotonic())
        except Exception as exc:  # closed at the end, or the session went away
            self.errors.append(f"monitor connection ended: {type(exc).__name__}: {exc}")

    def _event(self, e: dict, now: float) -> None:
        kind = e.get("event")
        if kind == "chunk":
            for k, v in (("t", now), ("index", e["index"]), ("compute_s", e["compute_s"]),
                         ("buffer_s", e["buffer_s"]), ("underruns", e["underruns"])):
                self.chunks[k].append(v)
        elif kind == "state":
            with self._cond:
                self._states.append(e["state"])
                self._cond.notify_all()
        elif kind == "ready":
            with self._cond:
                self.ready = e
                self._cond.notify_all()
        elif kind == "seed":
            self.seeds += 1
        elif kind == "recovered":
            self.recovered.append(e)
        elif kind == "error":
            self.errors.append(e["message"])
        elif kind == "end":
            self.end = e

    def state(self, timeout: float = 10.0) -> dict:
        with self._cond:
            self._states.clear()
            self.ws.send(json.dumps({"get": "state"}))
            if not self._cond.wait_for(lambda: self._states, timeout):
                raise TimeoutError("no answer to {\"get\": \"state\"}")
            return self._states[-1]

    def info(self, timeout: float = 10.0) -> dict:
        """The model's facts (the "ready" event, asked for again: it went out before this client connected)."""
        with self._cond:
            self.ws.send(json.dumps({"get": "info"}))
            if not self._cond.wait_for(lambda: self.ready, timeout):
                raise TimeoutError("no answer to {\"get\": \"info\"}")
            return self.ready

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        self._thread.join(5)


class Osc:
    """A python-osc client; a thread counts what comes back (ok, errors, chunk and auto-cycle events)."""

    def __init__(self, port: int, record: FrontEnd):
        from pythonosc.udp_client import SimpleUDPClient
        self.client, self.record, self.oks, self.errors = SimpleUDPClient("127.0.0.1", port), record, 0, []
        self.last_chunk = -1
        self._stop = threading.Event()
        self.client.send_message("/cf/get", "info")  # binds the socket, so there is something to receive on
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def send(self, address: str, *args) -> None:
        self.client.send_message(address, list(args))

    def _read(self) -> None:
        from pythonosc.osc_packet import OscPacket, ParseError
        counts = self.record.counters
        while not self._stop.is_set():
            data = self.client.receive(timeout=0.5)
            if not data:
                continue
            try:
                messages = [m.message for m in OscPacket(data).messages]
            except ParseError:
                counts["unreadable"] = counts.get("unreadable", 0) + 1
                continue
            for m in messages:
                kind = m.address.rsplit("/", 1)[-1]
                counts[kind] = counts.get(kind, 0) + 1
                if kind == "chunk":
                    self.last_chunk = m.params[0]
                elif kind == "error":
                    self.errors.append(m.params)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


def browser(record: FrontEnd):
    """Headless Chromium under chromedriver, or None with record.unavailable saying why."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        record.unavailable = "no chromium and chromium-driver (Debian: apt-get install chromium chromium-driver)"
        return None
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        record.unavailable = "no selenium (pip install -e '.[test]')"
        return None
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1366,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(options=options, service=Service(driver_path))
    except Exception as exc:
        record.unavailable = f"chromium would not start under chromedriver: {str(exc).splitlines()[0]}"
        return None


# ---------------------------------------------------------------------------------------------- the soak

class Soak:
    """Runs the front ends' changes and the sampling in one thread: one change at a time, each checked in the
    engine's state before the next, so a change can be told from the others."""

    def __init__(self, args, rt: Realtime, monitor: Monitor, fronts: dict[str, FrontEnd], osc: Osc | None,
                 midi_out, driver, window: int, out: Path):
        self.args, self.rt, self.monitor, self.fronts = args, rt, monitor, fronts
        self.osc, self.midi_out, self.driver, self.window, self.out = osc, midi_out, driver, window, out
        self.rng = random.Random(args.seed)
        self.t0 = time.monotonic()
        self.samples: list[dict] = []
        self.saved: dict[str, dict] = {}  # preset name -> the state it was saved from
        self._next_sample = self.t0
        self._counts = {"osc_lfo": 0, "osc_preset": 0, "midi": 0, "browser": 0}
        self._chunks_seen = 0
        self._streak = {name: 0 for name in fronts}  # failures in a row; 5 and a front end is given up

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ------------------------------------------------------------------ checks and samples

    def check(self, front: FrontEnd, what: str, seen, timeout: float = 8.0) -> None:
        """Wait until the engine's state satisfies `seen`; count the change verified or record the failure."""
        deadline, why = time.monotonic() + timeout, "never seen in the engine's state"
        while time.monotonic() < deadline:
            self.tick()
            try:
                if seen(self.monitor.state()):
                    front.verified += 1
                    self._streak[front.name] = 0
                    return
            except (TimeoutError, OSError, KeyError) as exc:
                why = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
        front.fail(self.now(), what, f"{why} within {timeout:g} s")
        self._streak[front.name] += 1

    def tick(self) -> None:
        """Take a sample if one is due."""
        if time.monotonic() >= self._next_sample:
            self._next_sample = max(self._next_sample + self.args.interval, time.monotonic() + 0.5)
            self.sample()

    def sample(self) -> None:
        c = self.monitor.chunks
        n = len(c["index"])
        compute = c["compute_s"][self._chunks_seen:n]
        self._chunks_seen = n
        row = {"t": round(self.now(), 2), **proc_stats(self.rt.proc.pid),
               "chunks": c["index"][n - 1] + 1 if n else 0, "underruns": c["underruns"][n - 1] if n else 0,
               "buffer_s": round(c["buffer_s"][n - 1], 3) if n else None,
               "compute_ms_mean": round(1000 * float(np.mean(compute)), 1) if compute else None,
               "compute_ms_max": round(1000 * max(compute), 1) if compute else None,
               "osc_chunk": self.osc.last_chunk if self.osc else None, "page_chunk": None, "browser_pss_mb": None,
               "load1": round(os.getloadavg()[0], 2)}
        if self.driver is not None and self.fronts["browser"].connected:
            self._read_page(row)
        self.samples.append(row)
        if len(self.samples) == 1 or row["t"] // 60 > self.samples[-2]["t"] // 60:
            print(f"  [{row['t'] / 60:5.1f} min] rss {row['rss_mb']:.1f} MB, chunks {row['chunks']}, underruns "
                  f"{row['underruns']}, buffer {row['buffer_s']} s, compute {row['compute_ms_mean']} ms, page at "
                  f"chunk {row['page_chunk']}, load {row['load1']}", flush=True)

    def _read_page(self, row: dict) -> None:
        """The page's own chunk counter (it keeps receiving events?), its processes' memory, its console errors."""
        from selenium.webdriver.common.by import By
        front = self.fronts["browser"]
        try:
            text = self.driver.find_element(By.ID, "stat-index").text
            row["page_chunk"] = int(text) if text.isdigit() else None  # "–" until the page's first chunk event
            for entry in self.driver.get_log("browser"):
                if entry["level"] == "SEVERE":
                    front.fail(self.now(), "page console", entry["message"])
        except Exception as exc:
            front.fail(self.now(), "reading the page", f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
        row["browser_pss_mb"] = tree_pss_mb(self.driver.service.process.pid)
        before = [s["page_chunk"] for s in self.samples if s["page_chunk"] is not None]
        if before and row["page_chunk"] is not None and row["page_chunk"] <= before[-1]:
            front.counters["stalls"] = front.counters.get("stalls", 0) + 1  # no chunk event since the last sample

    # ------------------------------------------------------------------ the changes

    def act(self, name: str, action, *args) -> None:
        """Make one change through front end `name` (action returns what it did and how to see it) and check it."""
        front = self.fronts[name]
        if not front.connected or self._streak[name] >= 5:
            return
        try:
            what, seen = action(*args)
        except Exception as exc:  # the front end itself broke (a dead browser, a closed port): recorded, soak goes on
            front.fail(self.now(), action.__name__, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
            self._streak[name] += 1
            return
        front.actions += 1
        self.check(front, what, seen)

    def setup_osc(self) -> None:
        """Seed auto-cycling, two LFOs and a first preset, all over OSC."""
        self.act("osc", self._osc, ("/cf/auto_cycle", 32), "auto_cycle 32", lambda s: s["auto_cycle"] == 32)
        self.act("osc", self._osc, ("/cf/lfo/wobble", "target", "temperature", "shape", "sine", "rate", 16, "unit",
                                    "chunks", "depth", 0.2),
                 "LFO wobble on temperature", lambda s: _lfo(s, "wobble", "depth") == 0.2)
        self.act("osc", self._osc, ("/cf/lfo/shimmer", "target", "channel_bias", "index", 12, "shape", "random-hold",
                                    "rate", 4, "unit", "seconds", "depth", 0.5, "seed", 3),
                 "LFO shimmer on channel_bias 12", lambda s: _lfo(s, "shimmer", "index") == 12)
        self.act("osc", self._save, "soak-a")

    def _osc(self, message: tuple, what: str, seen):
        self.osc.send(*message)
        return what, seen

    def _save(self, name: str):
        path = self.out / PRESETS_DIR / f"{name}.json"
        before = path.stat().st_mtime_ns if path.exists() else 0
        self.saved[name] = self.monitor.state()
        self.osc.send("/cf/preset/save", name)
        return f"preset save {name}", lambda s: name in s["presets"] and path.stat().st_mtime_ns != before

    def osc_temperature(self):
        v = round(self.rng.uniform(0.7, 1.3), 2)
        self.osc.send("/cf/temperature", v)
        return f"temperature {v}", lambda s: s["temperature"] == v

    def osc_lfo(self):
        self._counts["osc_lfo"] += 1
        if self._counts["osc_lfo"] % 2:
            depth = round(self.rng.uniform(0.1, 0.3), 2)
            self.osc.send("/cf/lfo/wobble/depth", depth)
            return f"LFO wobble depth {depth}", lambda s: _lfo(s, "wobble", "depth") == depth
        rate = self.rng.choice((8, 16, 24))
        self.osc.send("/cf/lfo/wobble/rate", float(rate))
        return f"LFO wobble rate {rate}", lambda s: _lfo(s, "wobble", "rate") == rate

    def osc_preset(self):
        """Save soak-b, recall soak-a over 16 chunks, recall soak-b over 8, in turn."""
        self._counts["osc_preset"] += 1
        step = self._counts["osc_preset"] % 3
        if step == 1:
            return self._save("soak-b")
        name, chunks = ("soak-a", 16) if step == 2 else ("soak-b", 8)
        before, want = self.monitor.state(), self.saved[name]
        moves = [k for k in ("temperature", "gain", "token_scale", "channel_scale") if before[k] != want[k]]
        self.osc.send("/cf/preset/recall", name, chunks)
        keys = ("temperature", "gain", "token_scale", "channel_scale", "crossfade_chunks")
        return (f"preset recall {name} over {chunks} chunks",
                lambda s: all(s[k] == want[k] for k in keys) and (s["morph"] is not None or not moves))

    def midi_knob(self):
        import mido
        from codicodec_flow.realtime.midi_map import DEFAULT_MAP, cc_value
        self._counts["midi"] += 1
        cc, value = (74, 76, 77)[self._counts["midi"] % 3], self.rng.randint(40, 88)
        v = cc_value(DEFAULT_MAP.knob(cc, 1), value, self.window)
        name, part = {74: ("token_scale", slice(0, 8)), 76: ("channel_scale", slice(0, 32)),
                      77: ("channel_scale", slice(32, 64))}[cc]
        self.midi_out.send(mido.Message("control_change", control=cc, value=value))
        return f"CC {cc} = {value} ({name} {v})", lambda s: all(x == v for x in s[name][part])

    def browser_slider(self):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        self._counts["browser"] += 1
        name = ("gain", "crossfade_chunks")[self._counts["browser"] % 2]
        slider = self.driver.find_element(By.ID, f"ctl-{name}")
        now = float(slider.get_property("value"))
        down = now > 0.9 if name == "gain" else now > 6
        slider.send_keys((Keys.ARROW_LEFT if down else Keys.ARROW_RIGHT) * (5 if name == "gain" else 2))
        v = float(slider.get_property("value"))
        self.driver.execute_script("arguments[0].blur()", slider)  # so the page shows the engine's values again
        return f"slider {name} {now:g} -> {v:g}", lambda s: abs(s[name] - v) < 1e-9

    def run(self, seconds: float) -> None:
        if self.fronts["osc"].connected:
            self.setup_osc()
        rotation = [("osc", self.osc_temperature), ("midi", self.midi_knob), ("browser", self.browser_slider),
                    ("osc", self.osc_lfo), ("midi", self.midi_knob), ("browser", self.browser_slider),
                    ("osc", self.osc_preset)]
        end, next_action, i = self.t0 + seconds, time.monotonic(), 0
        while time.monotonic() < end and self.rt.proc.poll() is None:
            self.tick()
            if time.monotonic() >= next_action:
                name, action = rotation[i % len(rotation)]
                self.act(name, action)
                i += 1
                next_action = max(next_action + self.args.action_every, time.monotonic())
            time.sleep(0.05)
        self._next_sample = 0
        if self.rt.proc.poll() is None:
            self.tick()  # the last sample


def _lfo(state: dict, lfo_id: str, key: str):
    found = [lfo for lfo in state["lfos"] if lfo["id"] == lfo_id]
    return found[0][key] if found else None


# ---------------------------------------------------------------------------------------------- verdict and report

def verdict(samples: list[dict], chunks: dict, fronts: dict[str, FrontEnd], seconds: float, max_slope: float,
            returncode: int | None) -> dict:
    """Pass/fail with the figures behind it (see the module docstring for the thresholds)."""
    half = [s for s in samples if s["t"] >= seconds / 2]
    t_min, rss = np.array([s["t"] for s in half]) / 60, np.array([s["rss_mb"] for s in half])
    slope = float(np.polyfit(t_min, rss, 1)[0]) if len(half) >= 3 and np.ptp(t_min) > 0 else None
    noise = float(np.std(rss - np.polyval(np.polyfit(t_min, rss, 1), t_min))) if slope is not None else None
    n = len(chunks["index"])
    # chunks per second x chunk length, fitted past the start (the prebuffer is generated at once)
    steady = slice(min(8, n // 4), n)
    speed = float(np.polyfit(chunks["t"][steady], chunks["index"][steady], 1)[0]) * CHUNK_S if n >= 8 else None
    underruns = chunks["underruns"][-1] if n else None
    checks = {
        "memory_flat": slope is not None and slope <= max_slope,
        "no_underruns": underruns == 0,
        "real_speed": speed is not None and abs(speed - 1) <= 0.02,
        "front_ends": all(f.connected and f.verified > 0 and not f.failures for f in fronts.values()),
        "clean_exit": returncode == 0,
    }
    return {"pass": all(checks.values()), "checks": checks,
            "rss_mb": {"first": samples[0]["rss_mb"] if samples else None,
                       "second_half_start": float(rss[0]) if len(rss) else None,
                       "last": samples[-1]["rss_mb"] if samples else None,
                       "max": max(s["rss_mb"] for s in samples) if samples else None},
            "slope_mb_per_min": None if slope is None else round(slope, 4),
            "growth_second_half_mb": None if slope is None else round(slope * float(np.ptp(t_min)), 2),
            "residual_std_mb": None if noise is None else round(noise, 3),
            "max_slope_mb_per_min": max_slope, "underruns": underruns, "chunks": chunks["index"][-1] + 1 if n else 0,
            "speed": None if speed is None else round(speed, 4),
            "compute_ms": {"mean": round(1000 * float(np.mean(chunks["compute_s"])), 1),
                           "p95": round(1000 * float(np.percentile(chunks["compute_s"], 95)), 1),
                           "max": round(1000 * max(chunks["compute_s"]), 1)} if n else None}


def plot(samples: list[dict], chunks: dict, v: dict, seconds: float, path: Path) -> None:
    """Memory (with the second half's line), buffer and underruns, and compute time, over the soak's minutes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (mem, buf, comp) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    t, rss = np.array([s["t"] for s in samples]) / 60, np.array([s["rss_mb"] for s in samples])
    mem.plot(t, rss, ".-", ms=3, lw=0.8, label="realtime process RSS")
    if v["slope_mb_per_min"] is not None:
        half = t >= seconds / 120
        mem.plot(t[half], np.polyval(np.polyfit(t[half], rss[half], 1), t[half]), "r-",
                 label=f"second half: {v['slope_mb_per_min']:+.3f} MB/min")
    mem.set_ylabel("MB")
    mem.legend(loc="lower right")
    tc = np.array(chunks["t"]) / 60
    buf.plot(tc, chunks["buffer_s"], lw=0.6, label="buffer after each chunk (s)")
    buf.step(tc, chunks["underruns"], "r", where="post", label="underruns so far")
    buf.set_ylabel("s / count")
    buf.legend(loc="center right")
    comp.plot(tc, 1000 * np.array(chunks["compute_s"]), lw=0.6, label="compute per chunk (ms)")
    comp.axhline(1000 * CHUNK_S, color="r", ls="--", lw=0.8, label="real time (683 ms)")
    comp.set(ylabel="ms", yscale="log", xlabel="minutes")
    comp.legend(loc="upper right")
    fig.suptitle(f"live rig soak: {'PASS' if v['pass'] else 'FAIL'}, {v['chunks']} chunks, {v['underruns']} underruns")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = None
    return {"cpu": cpu.group(1).strip() if cpu else platform.processor(), "cores": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch_version}


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=20.0, help="how long the stream runs (default 20)")
    p.add_argument("--out", required=True, help="folder for soak.json, soak.png, realtime.log and the checkpoint")
    p.add_argument("--ckpt", default=None, help="a checkpoint to run (default: random weights of --model)")
    p.add_argument("--model", default="small", choices=("small", "default", "tiny"),
                   help="model preset of the random checkpoint (default small)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    p.add_argument("--action-every", type=float, default=2.0,
                   help="seconds between front-end changes, taken in turn by OSC, MIDI and the page (default 2)")
    p.add_argument("--max-slope", type=float, default=0.1,
                   help="largest memory slope over the second half that counts as flat, MB/min (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the changes' random values")
    a = p.parse_args(argv)
    if a.minutes <= 0 or a.interval <= 0 or a.action_every <= 0:
        p.error("--minutes, --interval and --action-every must be positive")
    return a


class Rig:
    """The session and everything connected to it, closed in reverse order."""
    rt: Realtime | None = None
    monitor: Monitor | None = None
    osc: Osc | None = None
    midi_out = None
    driver = None
    url: str = ""

    def connect(self, out: Path, ckpt: Path, midi: MidiSystem, fronts: dict[str, FrontEnd]) -> None:
        """Start the session and connect the monitor and the three front ends (RuntimeError: no session)."""
        self.rt = Realtime(ckpt, out, midi.error is None, midi.env)
        osc_port = int(self.rt.wait_for(r"control: osc on [\d.]+:(\d+)", 300).group(1))
        self.url = self.rt.wait_for(r"ui: (http://\S+)", 60).group(1)
        if midi.error is None:
            self.rt.wait_for(r"midi: ", 60)
        self.monitor = Monitor(int(self.url.rstrip("/").rsplit(":", 1)[1]))
        self.osc = Osc(osc_port, fronts["osc"])
        fronts["osc"].connected = True  # until no reply comes back (checked at the end)
        if midi.error is None:
            try:
                self.midi_out = midi.output(VIRTUAL_PORT)
                fronts["midi"].connected = True
            except Exception as exc:
                fronts["midi"].fail(0.0, "opening the MIDI port", f"{type(exc).__name__}: {exc}")
        self.driver = browser(fronts["browser"])
        if self.driver is not None:
            try:
                self._load_page()
                fronts["browser"].connected = True
            except Exception as exc:
                fronts["browser"].fail(0.0, "loading the page", f"{type(exc).__name__}: {str(exc).splitlines()[0]}")

    def _load_page(self) -> None:
        from selenium.webdriver.common.by import By
        self.driver.get(self.url)
        deadline = time.monotonic() + 60
        while not (self.driver.find_elements(By.ID, "ctl-gain") and
                   self.driver.find_element(By.ID, "conn").text == "connected"):
            if time.monotonic() > deadline:
                raise TimeoutError("the page built no controls in 60 s")
            time.sleep(0.2)

    def close(self) -> int | None:
        """Quit the session (it ends as after {"quit": true}) and close everything; its exit status."""
        if self.monitor is not None and self.rt.proc.poll() is None:
            try:
                self.monitor.ws.send(json.dumps({"quit": True}))
            except Exception:
                pass
        for thing in (self.osc, self.midi_out):
            if thing is not None:
                thing.close()
        if self.driver is not None:
            self.driver.quit()
        returncode = self.rt.stop() if self.rt is not None else None
        if self.monitor is not None:
            self.monitor.close()
        return returncode


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds, load_start = args.minutes * 60, os.getloadavg()
    if args.ckpt:
        ckpt, weights = Path(args.ckpt), f"the given checkpoint {args.ckpt}"
    else:
        ckpt, weights = make_checkpoint(out / f"random-{args.model}.pt", args.model), "random"
        print(f"checkpoint: {ckpt} ({args.model} preset, RANDOM weights: this soak measures the rig, not the music)",
              flush=True)
    fronts = {name: FrontEnd(name) for name in ("osc", "midi", "browser")}
    midi, rig, soak = MidiSystem(), Rig(), None
    fronts["midi"].unavailable = midi.error
    try:
        rig.connect(out, ckpt, midi, fronts)
        info = rig.monitor.info()
        print(f"soaking for {args.minutes:g} min: realtime pid {rig.rt.proc.pid}, {rig.url}, midi "
              f"{'on' if fronts['midi'].connected else fronts['midi'].unavailable or 'failed'}, browser "
              f"{'on' if fronts['browser'].connected else fronts['browser'].unavailable or 'failed'}", flush=True)
        soak = Soak(args, rig.rt, rig.monitor, fronts, rig.osc, rig.midi_out, rig.driver, info["window"], out)
        soak.run(seconds)
        if rig.rt.proc.poll() is not None:
            fronts["osc"].fail(soak.now(), "the session", f"ended early, exit status {rig.rt.proc.returncode}")
    except (RuntimeError, TimeoutError, OSError) as exc:
        if soak is not None:
            raise
        print(f"soak: could not start: {exc}", file=sys.stderr)  # the session never came up
        return 2
    finally:
        returncode = rig.close()
        midi.close()
    if not fronts["osc"].counters.get("ok"):
        fronts["osc"].connected = False
        fronts["osc"].fail(soak.now(), "replies", "no /cf/ok came back over OSC")
    fronts["osc"].counters["errors_received"] = rig.osc.errors[:20]
    report = write_report(args, out, soak, rig, fronts, info, weights, ckpt, load_start, returncode)
    print_verdict(report, fronts, out)
    return 0 if report["verdict"]["pass"] else 1


def write_report(args, out: Path, soak: Soak, rig: Rig, fronts: dict[str, FrontEnd], info: dict, weights: str,
                 ckpt: Path, load_start: tuple, returncode: int | None) -> dict:
    """soak.json and soak.png; the report."""
    mon, samples = rig.monitor, soak.samples
    chunks = {**mon.chunks, "t": [round(t - soak.t0, 3) for t in mon.chunks["t"]]}  # seconds since the soak began
    v = verdict(samples, chunks, fronts, args.minutes * 60, args.max_slope, returncode)
    report = {
        "what": "codicodec-flow live rig soak (scripts/soak_live.py)", "weights": weights, "checkpoint": str(ckpt),
        "model": info.get("model"), "codec": info.get("codec"), "window": info.get("window"),
        "command": rig.rt.cmd, "minutes": args.minutes, "interval_s": args.interval,
        "action_every_s": args.action_every, "machine": machine(),
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()],
                         "mean_1min": round(float(np.mean([s["load1"] for s in samples])), 2) if samples else None},
        "thresholds": {"max_slope_mb_per_min": args.max_slope, "underruns": 0, "speed_tolerance": 0.02},
        "verdict": v, "front_ends": {k: asdict(f) for k, f in fronts.items()},
        "events": {"auto_cycled_seeds": mon.seeds, "recovered_count": len(mon.recovered),
                   "recovered": mon.recovered[:50], "errors": mon.errors[:50]},
        "end_event": mon.end, "returncode": returncode, "log": str(rig.rt.log),
        "log_tail": rig.rt.text().splitlines()[-6:], "samples": samples, "chunks": chunks,
    }
    (out / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(samples, chunks, v, args.minutes * 60, out / "soak.png")
    return report


def print_verdict(report: dict, fronts: dict[str, FrontEnd], out: Path) -> None:
    v, load = report["verdict"], report["load_average"]
    rss = v["rss_mb"]
    print(f"\nweights: {report['weights']} (the rig is measured, not the music)")
    print(f"memory: RSS {rss['first']} MB at the start, {rss['second_half_start']} MB at half time, {rss['last']} MB "
          f"at the end (max {rss['max']}); second half slope {v['slope_mb_per_min']} MB/min "
          f"(flat: <= {v['max_slope_mb_per_min']}), {v['growth_second_half_mb']} MB over it, residual noise "
          f"{v['residual_std_mb']} MB")
    print(f"stream: {v['chunks']} chunks, {v['underruns']} underruns, speed {v['speed']} x real time; compute per "
          f"chunk {v['compute_ms']} ms; {report['events']['auto_cycled_seeds']} auto-cycled seeds, "
          f"{report['events']['recovered_count']} recovered chunks")
    for f in fronts.values():
        state = "connected" if f.connected else f"NOT connected ({f.unavailable or 'see failures'})"
        print(f"{f.name}: {state}; {f.actions} changes, {f.verified} seen in the engine, {len(f.failures)} failures"
              f"{'; ' + json.dumps(f.counters) if f.counters else ''}")
    print(f"load average: start {load['start']}, end {load['end']}, mean over the samples {load['mean_1min']}")
    failed = [k for k, ok in v["checks"].items() if not ok]
    print(f"verdict: {'PASS' if v['pass'] else 'FAIL (' + ', '.join(failed) + ')'}; {out / 'soak.json'}, "
          f"{out / 'soak.png'}")


if __name__ == "__main__":
    sys.exit(main())
