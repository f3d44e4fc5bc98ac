"""`cpt-tui serve` (issue 16): the Textual UI in a browser through textual-serve.

The browser is Debian's headless Chromium, driven over the DevTools protocol (a websocket, with
aiohttp, which textual-serve depends on): it opens the page; the terminal output the page receives
(the websocket frames, ANSI text) shows the runs list with the sample runs (screenshot saved as a test
artefact: $CPT_TUI_ARTEFACTS or the test's tmp dir); Enter, typed into the page, opens the selected
run's detail (its footer's bindings appear); SIGTERM stops the server, which exits 0 and leaves no UI process behind.
Refusals: --host 0.0.0.0 without --public → exit 2 with the reason.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.demo_run import ROOT, cli_env, run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][0-9A-Za-z]|\x1b[=>]")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_non_loopback_host_without_public_is_refused(tmp_path):
    env = cli_env(tmp_path / "home", tmp_path / "cache")
    r = run_cli(["serve", "--host", "0.0.0.0"], env, timeout=60)
    assert r.returncode == 2
    assert "not a loopback address" in r.stderr and "--public" in r.stderr and "authentication" in r.stderr


def test_loopback_names():
    from cpt_tui.cli.serve import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")


class CDP:
    """The few DevTools-protocol calls the test needs."""

    def __init__(self, ws):
        self.ws, self.n, self.frames = ws, 0, []
        self.pending: dict[int, asyncio.Future] = {}

    async def pump(self):
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            elif data.get("method") == "Network.webSocketFrameReceived":
                r = data["params"]["response"]
                raw = base64.b64decode(r["payloadData"]) if r["opcode"] == 2 else r["payloadData"].encode()
                self.frames.append(raw)

    async def call(self, method, **params):
        self.n += 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.n] = fut
        await self.ws.send_json({"id": self.n, "method": method, "params": params})
        out = await asyncio.wait_for(fut, 60)
        assert "error" not in out, out
        return out.get("result", {})

    def text(self) -> str:
        return ANSI.sub(b"", b"".join(self.frames)).decode("utf-8", "replace")

    async def until(self, pred, timeout, what):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred(self.text()):
                return
            await asyncio.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}; page text so far: {self.text()[-2000:]!r}")


async def drive(url: str, devtools: str, shot: Path, run_id: str) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        targets = await (await http.get(f"{devtools}/json/list")).json()
        page = next(t for t in targets if t["type"] == "page")
        async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            cdp = CDP(ws)
            pump = asyncio.create_task(cdp.pump())
            await cdp.call("Network.enable")
            await cdp.call("Page.enable")
            await cdp.call("Emulation.setDeviceMetricsOverride", width=1400, height=860, deviceScaleFactor=1,
                           mobile=False)
            await cdp.call("Page.navigate", url=url)
            await cdp.until(lambda t: run_id in t and "tiny-demo" in t, 120, "the runs list")
            await asyncio.sleep(2.0)  # let the page paint the last frames
            png = await cdp.call("Page.captureScreenshot", format="png")
            shot.write_bytes(base64.b64decode(png["data"]))
            # keyboard focus to the page's terminal (xterm's input element), no click: only a key opens the run
            await cdp.call("Runtime.evaluate", expression="document.querySelector('.xterm-helper-textarea').focus()")
            mark = len(cdp.text())
            for kind in ("keyDown", "keyUp"):
                await cdp.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                               windowsVirtualKeyCode=13, nativeVirtualKeyCode=13,
                               **({"text": "\r"} if kind == "keyDown" else {}))
            await cdp.until(lambda t: "Step/tokens" in t[mark:] and "Attach logs" in t[mark:], 60,
                            "the run's detail screen (its footer)")
            await asyncio.sleep(1.5)
            png = await cdp.call("Page.captureScreenshot", format="png")
            shot.with_name(shot.stem + "-detail.png").write_bytes(base64.b64decode(png["data"]))
            pump.cancel()


@pytest.mark.timeout(300)
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_serve_in_headless_chromium_lists_runs_opens_a_detail_and_stops_cleanly(tmp_path):
    pytest.importorskip("textual_serve")
    pytest.importorskip("aiohttp")
    from cpt_tui.ui.sample_db import build

    home = tmp_path / "home"
    home.mkdir()
    env = cli_env(home, tmp_path / "cache")
    runs = build(env["CPT_TUI_DB"], home / "runs")
    artefacts = Path(os.environ.get("CPT_TUI_ARTEFACTS") or tmp_path)
    artefacts.mkdir(parents=True, exist_ok=True)
    port, dport = free_port(), free_port()
    server = subprocess.Popen([sys.executable, "-m", "cpt_tui.cli", "serve", "--port", str(port)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    browser = None
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.3)
        browser = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
                                    "--no-first-run", "--disable-extensions", f"--remote-debugging-port={dport}",
                                    f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1400,860",
                                    "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        devtools = f"http://127.0.0.1:{dport}"
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{devtools}/json/version", timeout=2).read()
                break
            except OSError:
                time.sleep(0.3)
        asyncio.run(drive(url, devtools, artefacts / "browser-view.png", sorted(runs)[0]))
        assert (artefacts / "browser-view.png").stat().st_size > 10_000
    finally:
        if browser:
            os.killpg(browser.pid, signal.SIGTERM)
            browser.wait(30)
    server.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0
    out = server.stdout.read()
    assert f"serving the UI at http://127.0.0.1:{port}" in out
    time.sleep(1)
    left = subprocess.run(["pgrep", "-s", str(server.pid)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left in the server's session: {left}"
