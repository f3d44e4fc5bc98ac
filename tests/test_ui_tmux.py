"""Real terminal: the app in tmux (keys by send-keys, screen by capture-pane) following a live run —
a writer process appends metric rows to the SQLite database the UI reads, as a supervisor would —
and the UI process never imports torch."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpt_tui.ui import sample_db

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _tmux_installed():
    """Skip without tmux — or fail under CI, where .ci/setup-hosts.sh installs it."""
    from tests.hosts import require

    require(shutil.which("tmux") is not None, "tmux not installed (.ci/setup-hosts.sh)")

# Starts the UI alone (no orphan adoption) and, at exit, writes which heavy modules it imported.
UI = """
import atexit, json, sys
out = sys.argv[2]
atexit.register(lambda: open(out, "w").write(json.dumps(
    [m for m in ("torch", "transformers", "accelerate", "deepspeed") if m in sys.modules])))
from cpt_tui.ui.app import run_app
run_app(sys.argv[1])
"""


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=20).stdout


def wait_screen(session: str, pattern: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        screen = tmux("capture-pane", "-p", "-t", session)
        if re.search(pattern, screen):
            return screen
        time.sleep(0.3)
    raise AssertionError(f"{pattern!r} not on screen:\n{screen}")


def live_row(screen: str) -> str:
    return next(l for l in screen.splitlines() if sample_db.LIVE in l)


def test_tmux_shows_live_progress(tmp_path):
    db = tmp_path / "cpt-tui.db"
    sample_db.build(db)
    modules = tmp_path / "modules.json"
    session = f"cpt-ui-test-{os.getpid()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CPT_TUI_HOME": str(tmp_path / "home"), "TERM": "xterm-256color"}
    writer = subprocess.Popen([sys.executable, "-m", "cpt_tui.ui.sample_db", "live", str(db), sample_db.LIVE, "1.0"],
                              cwd=ROOT, env=env)
    cmd = " ".join(["exec", sys.executable, "-c", _shq(UI), str(db), str(modules)])
    tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "40", "-e", f"PYTHONPATH={ROOT}",
         "-e", f"CPT_TUI_HOME={tmp_path / 'home'}", "-c", str(ROOT), cmd)
    try:
        first = live_row(wait_screen(session, sample_db.LIVE))
        second = live_row(wait_screen(session, sample_db.LIVE))
        deadline = time.monotonic() + 20
        while second == first and time.monotonic() < deadline:  # the table follows the writer
            time.sleep(0.5)
            second = live_row(wait_screen(session, sample_db.LIVE))
        assert second != first, first
        pct = lambda row: int(re.search(r"(\d+)%", row).group(1))
        assert pct(second) >= pct(first) >= 75
        # filter to the live run, open it: its stage timeline counts up
        tmux("send-keys", "-t", session, "/")
        time.sleep(0.5)  # the filter input takes the focus
        tmux("send-keys", "-t", session, "c3d4", "Enter")
        screen = wait_screen(session, r"c3d4")
        time.sleep(1.0)
        assert sample_db.DONE not in tmux("capture-pane", "-p", "-t", session)
        tmux("send-keys", "-t", session, "Enter")
        screen = wait_screen(session, r"cpt-code \[cpt\] \d+/96")
        step1 = int(re.search(r"cpt-code \[cpt\] (\d+)/96", screen).group(1))
        screen = wait_screen(session, rf"cpt-code \[cpt\] (?!{step1}/)\d+/96", timeout=20)
        assert "train loss" in screen and "validation loss per domain" in screen
        tmux("send-keys", "-t", session, "q")
        deadline = time.monotonic() + 15
        while not modules.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert json.loads(modules.read_text()) == []  # no torch / transformers / accelerate in the UI
    finally:
        tmux("kill-session", "-t", session)
        writer.terminate()
        writer.wait(10)


def _shq(s: str) -> str:
    import shlex
    return shlex.quote(s)
