"""The browser control surface (realtime --ui): its HTTP side, its WebSocket's origin policy, and the page itself in
a real headless Chromium (Debian's chromium + chromium-driver through selenium; skipped with the reason without)."""
import contextlib
import http.client
import io
import json
import re
import shutil
import socket
import threading
import time
from dataclasses import replace

import pytest
import websockets
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from codicodec_flow.config import LIVE_SAMPLING
from codicodec_flow.realtime.engine import EngineConfig
from codicodec_flow.realtime.protocol import ConnectionLimits
from codicodec_flow.realtime.session import RealtimeConfig, run_realtime
from codicodec_flow.realtime.ui_server import FILES, UiServer, load_pages
from codicodec_flow.realtime.websocket import same_address_origin
from test_realtime import ckpt, make_engine  # noqa: F401  (ckpt is a fixture)
from test_realtime_control import Lines, _ws_frame

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


def _get(port: int, path: str, method: str = "GET"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), body


def _ask(ws, msg: dict, want: str, timeout: float = 10.0) -> dict:
    """Send msg and return the first event of kind `want` (chunk events may come in between)."""
    ws.send(json.dumps(msg))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic())))
        if event["event"] == want:
            return event
        assert event["event"] != "error", event
    raise AssertionError(f"no {want} event")


def _until(check, timeout=10.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def ui():
    engine = make_engine(max_chunks=2)
    server = UiServer(engine, 0, limits=ConnectionLimits(idle_s=1.5))
    try:
        yield server
    finally:
        server.close()


def test_page_files_ship_with_the_package_and_load_nothing_from_elsewhere():
    pages = load_pages()
    assert set(pages) == set(FILES) and all(p.body for p in pages.values())
    index = pages["/index.html"].body.decode()
    assert 'src="app.js"' in index and 'href="style.css"' in index
    for page in pages.values():  # works offline: no CDN, no web fonts, no absolute URL of any kind
        assert not re.search(rb"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/|@import|url\(", page.body, re.I), page


def test_http_serves_the_three_files_and_nothing_else(ui):
    status, headers, body = _get(ui.port, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"app.js" in body
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"] and headers["Cache-Control"] == "no-store"
    for path, kind in FILES.items():
        status, headers, body = _get(ui.port, path + "?v=2")
        assert status == 200 and headers["Content-Type"] == kind and body == load_pages()[path].body
    for path in ("/ui/", "/ui/app.js", "/../pyproject.toml", "/%2e%2e/app.js", "/app.js/", "/favicon.ico", "//"):
        assert _get(ui.port, path)[0] == 404, path  # no directory listing, no path outside the three files
    for method, path in (("POST", "/"), ("HEAD", "/app.js")):
        try:
            status = _get(ui.port, path, method)[0]
        except http.client.RemoteDisconnected:
            status = None  # what websockets before 17 (the last ones for Python 3.10) do: close without an answer
        assert status == (405 if int(websockets.__version__.split(".")[0]) >= 17 else None), (method, status)
    assert _get(ui.port, "/ws")[0] == 426  # the WebSocket's path, without an upgrade
    assert ui.url == f"http://127.0.0.1:{ui.port}/"


def test_websocket_at_ws_accepts_the_pages_own_origin_and_refuses_other_sites(ui):
    own = f"http://127.0.0.1:{ui.port}"
    for origin in (own, f"http://localhost:{ui.port}", None):
        with connect(f"ws://127.0.0.1:{ui.port}/ws", origin=origin) as ws:
            state = _ask(ws, {"set": {"temperature": 0.5}, "get": "state"}, "state")
            assert state["state"]["temperature"] == 0.5
    for origin in ("https://evil.example", "null", "http://127.0.0.1.evil.example"):
        with pytest.raises(InvalidStatus) as refused:
            connect(f"ws://127.0.0.1:{ui.port}/ws", origin=origin).close()
        assert refused.value.response.status_code == 403
    with socket.create_connection(("127.0.0.1", ui.port), timeout=10) as two:  # which one would count? neither
        two.sendall(f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                    f"Origin: {own}\r\nOrigin: https://evil.example\r\n\r\n".encode())
        assert two.recv(12) == b"HTTP/1.1 400"
    with pytest.raises(InvalidStatus) as elsewhere:  # the WebSocket is at /ws only
        connect(f"ws://127.0.0.1:{ui.port}/", origin=own).close()
    assert elsewhere.value.response.status_code == 404


def test_a_ping_keeps_a_page_connected_and_silence_closes_it(ui):
    with connect(f"ws://127.0.0.1:{ui.port}/ws") as quiet, connect(f"ws://127.0.0.1:{ui.port}/ws") as pinging:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.5:  # idle_s is 1.5: only pings keep this one open
            pinging.ping()
            time.sleep(0.3)
        assert _ask(pinging, {"get": "state"}, "state")["state"]["next_chunk"] == 0
        idle = json.loads(quiet.recv(timeout=1))
        assert idle["event"] == "error" and "no message for 1.5 s" in idle["message"]


def test_a_page_that_stops_reading_never_blocks_the_engine_and_is_dropped():
    engine = make_engine()
    control = UiServer(engine, 0, limits=ConnectionLimits(idle_s=1.0))
    threads = threading.active_count()
    stuck = socket.socket()  # a WebSocket that stops reading, with a small window (no buffer autotuning)
    try:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.settimeout(10)
        stuck.connect(("127.0.0.1", control.port))
        stuck.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        assert stuck.recv(12) == b"HTTP/1.1 101"
        stuck.sendall(_ws_frame('{"get": "info"}'))  # answered once the client is served (and gets events) ...
        _until(lambda: b'"event":"ok"' in stuck.recv(65536), 5, "its first reply")  # ... then it reads nothing
        big = {"event": "waveform", "data": "x" * 60_000}  # the server's send buffer (4 MB at most) fills at once
        t0 = time.monotonic()
        for _ in range(400):
            control.hub.broadcast(big)  # what the engine's thread does for every event
        assert time.monotonic() - t0 < 2.0  # queued or dropped, never waited for
        _until(lambda: control.active == 0, 6, "the stuck client dropped (idle 1 s + 1 s flush)")
        _until(lambda: threading.active_count() <= threads, 5, "its threads gone, though it never closed")
        with connect(f"ws://127.0.0.1:{control.port}/ws") as ws:  # and the port serves others as before
            assert _ask(ws, {"get": "state"}, "state")["state"]["next_chunk"] == 0
    finally:
        stuck.close()
        control.close()


@pytest.mark.parametrize("origin, host, ok", [
    ("http://192.168.1.5:8765", "192.168.1.5:8765", True),  # the page, opened from another machine on the LAN
    ("http://[fe80::1]:8765", "[fe80::1]:8765", True),
    ("http://203.0.113.9:8765", "192.168.1.5:8765", False),  # another site's page at its own address
    ("http://rebind.example:8765", "rebind.example:8765", False),  # a name can be re-pointed at us (DNS rebinding)
    ("http://192.168.1.5:9999", "192.168.1.5:9999", False),  # another port: another server's page
    ("https://192.168.1.5:8765", "192.168.1.5:8765", False), ("null", "192.168.1.5:8765", False),
    (None, "192.168.1.5:8765", False),
])
def test_a_lan_page_is_accepted_only_from_the_address_it_was_served_at(origin, host, ok):
    assert same_address_origin(origin, host, 8765) == ok


@pytest.mark.parametrize("extra, said", [
    (["--ui-host", "0.0.0.0"], "--ui-host applies with --ui PORT only"),
    (["--ui", "70000"], "--ui 70000: a port is 0..65535"),
])
def test_realtime_refuses_bad_ui_flags(ckpt, capsys, extra, said):  # noqa: F811
    from codicodec_flow.commands.cli import main
    assert main(["realtime", "--ckpt", str(ckpt), "--sink", "null", "--max-chunks", "1", "--no-keys", *extra]) == 2
    assert said in capsys.readouterr().err


def test_session_serves_the_page_and_says_where(ckpt):  # noqa: F811
    out = Lines()
    cfg = RealtimeConfig(ckpt=str(ckpt), device="cpu", sink="null", pace="realtime", ui=0, keyboard=False, plain=True,
                         engine=EngineConfig(max_chunks=3))
    session = threading.Thread(target=run_realtime, args=(cfg, io.StringIO(""), out), daemon=True)
    session.start()
    url = _until(lambda: re.search(r"ui: (http://127\.0\.0\.1:\d+/) \(open it in a browser\)", out.text), 60,
                 "the session's ui line").group(1)
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    assert _get(port, "/")[0] == 200
    session.join(30)
    assert not session.is_alive() and "warning" not in out.text  # on 127.0.0.1: nothing to warn about
    with pytest.raises(OSError):  # the port closes with the session
        _get(port, "/")


# ---------------------------------------------------------------------------------------------- the page, in Chromium

def _browser():
    """A headless Chromium through chromedriver, or pytest.skip with the reason."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1366,1000"):  # a laptop's screen
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:  # the given driver: selenium must not go looking on the network for one
        return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    except Exception as exc:  # e.g. a chromium too old or too new for the driver
        pytest.skip(f"chromium is installed but would not start under chromedriver: {str(exc).splitlines()[0]}")


def test_the_page_in_a_real_browser_steers_the_engine(ckpt, tmp_path):  # noqa: F811
    driver = _browser()
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    out = Lines()
    cfg = RealtimeConfig(ckpt=str(ckpt), device="cpu", sink="null", pace="realtime", ui=0, keyboard=False, plain=True,
                         presets=str(tmp_path / "presets"), sample=replace(LIVE_SAMPLING, seed=3),
                         engine=EngineConfig(max_chunks=500))  # ~6 minutes at the speed of sound: ended by quit below
    session = threading.Thread(target=run_realtime, args=(cfg, io.StringIO(""), out), daemon=True)
    session.start()
    url = _until(lambda: re.search(r"ui: (http://\S+)", out.text), 60, "the session's ui line").group(1)
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    stack = contextlib.ExitStack()
    try:
        ws = stack.enter_context(connect(f"ws://127.0.0.1:{port}/ws"))  # a second client: what the engine has
        state = lambda: _ask(ws, {"get": "state"}, "state")["state"]  # noqa: E731
        driver.get(url)
        find = lambda id_: driver.find_element(By.ID, id_)  # noqa: E731
        _until(lambda: driver.find_elements(By.ID, "ctl-temperature") and find("seed-now").text == "3", 15,
               "the controls built from help and the state shown")
        assert {"ctl-nfe", "ctl-solver", "ctl-cfg_scale", "ctl-context_chunks", "ctl-gain", "ctl-crossfade_chunks",
                "ctl-auto_cycle", "tok-7"} <= {e.get_attribute("id") for e in driver.find_elements(By.CSS_SELECTOR,
                                                                                                   "[id]")}
        find("ctl-temperature").send_keys(Keys.ARROW_LEFT * 5)  # the slider moves in steps of 0.01
        _until(lambda: state()["temperature"] == 0.95, 5, "temperature 0.95 in the engine")
        find("btn-seed-cut").click()
        _until(lambda: state()["seed"] != 3, 5, "a new seed in the engine")
        find("tok-2").send_keys(Keys.ARROW_RIGHT * 10)
        channels = find("channels")  # 64 bars, bias from +2 (top) to -2 (bottom): click column 10 near the top
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", channels)
        w, h = channels.size["width"], channels.size["height"]
        ActionChains(driver).move_to_element_with_offset(channels, int((10.5 / 64 - 0.5) * w), int(-h / 2 + h / 8)) \
            .click().perform()
        steered = _until(lambda: (s := state())["channel_bias"][10] > 1 and s["token_bias"][2] == 0.1 and s, 5,
                         "channel_bias 10 and token_bias 2 set in the engine")
        assert steered["channel_bias"][10] == pytest.approx(1.5, abs=0.1)
        assert sum(map(abs, steered["channel_bias"])) == steered["channel_bias"][10]  # that cell's column alone
        find("btn-lfo-add").click()
        _until(lambda: [lfo["target"] for lfo in state()["lfos"]] == ["temperature"], 5, "an LFO in the engine")
        _until(lambda: driver.find_elements(By.CSS_SELECTOR, '#lfo-rows tr[data-lfo="lfo1"]'), 5, "the LFO's row")
        find("preset-name").send_keys(".hidden")  # a name the engine refuses: its error shows on the status line
        find("btn-preset-save").click()
        _until(lambda: "error" in find("status").get_attribute("class") and "preset" in find("status").text, 5,
               "the engine's error on the status line")
        for canvas in ("heat", "meter"):  # the latents and waveform events arrived and were drawn
            _until(lambda: int(find(canvas).get_attribute("data-index") or 0) >= 2, 10, f"{canvas} data")
        assert int(find("stat-index").text) >= 1 and find("stat-underruns").text == "0"
        driver.execute_script("window.scrollTo(0, 0)")
        shot = tmp_path / "realtime-ui.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        print(f"screenshot of the page: {shot}")
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
    finally:
        driver.quit()
        with connect(f"ws://127.0.0.1:{port}/ws") as quit_ws:
            _ask(quit_ws, {"quit": True}, "ok")
        stack.close()
        session.join(15)
    assert not session.is_alive()
