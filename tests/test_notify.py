"""Notifications (cpt_tui/notify.py, issue 16) through apprise, to a JSON webhook on loopback.

The real run: a one-stage tiny preset whose step 3 has a NaN loss (skipped), notifying the preset's
`json://` URL (a loopback http.server) and, through `--notify`, a URL whose port refuses
connections. The server receives exactly one JSON message per event kind (nan, stage_done,
run_done), each naming run, stage, step and reason; the refused URL leaves the run done, its failed
deliveries recorded as `warning` events (kind notify); no URL reaches SQLite.
"""

from __future__ import annotations

import collections
import json
import socket
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import yaml

from tests.demo_run import run_cli, tiny_preset


class Hook(BaseHTTPRequestHandler):
    got: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        Hook.got.append((self.path, json.loads(body)))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *a):
        pass


@pytest.fixture
def hook():
    Hook.got = []
    srv = HTTPServer(("127.0.0.1", 0), Hook)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1], Hook.got
    srv.shutdown()
    srv.server_close()


def refused_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return port


def _kind(msg: dict) -> str:
    return dict(line.split(": ", 1) for line in msg["message"].splitlines())["event"]


# --------------------------------------------------------------------------- units


def test_notifier_maps_transitions_and_events_to_one_message_each():
    from cpt_tui.notify import Notifier

    sent = []
    n = Notifier(["json://x"], "R1", send=lambda *m: sent.append(m) or True)
    n.run_event("status", {"state": "stage_started", "stage_name": "s1"})
    n.records([{"stage": "s1", "type": "metric", "step": 4},
               {"stage": "s1", "type": "warning", "kind": "nan", "step": 5, "message": "non-finite loss at step 5"},
               {"stage": "s1", "type": "warning", "kind": "nan", "step": 6, "message": "again"},
               {"stage": "s1", "type": "status", "state": "done", "step": 9}])
    n.run_event("status", {"state": "stage_done", "stage_name": "s1"})
    n.run_event("status", {"state": "failed", "reason": "stage 's2' failed (exit 1); restart limit 3 reached"})
    n.run_event("warning", {"kind": "notify", "message": "x"})
    n.close()
    kinds = [k for k, _, _ in sent]
    assert kinds == ["nan", "stage_done", "restart_limit"]
    body = dict(line.split(": ", 1) for line in sent[1][2].splitlines())
    assert body == {"event": "stage_done", "run": "R1", "stage": "s1", "step": "9", "reason": "stage 's1' finished"}


def test_a_raising_sender_is_a_failure_message_not_an_exception():
    from cpt_tui.notify import Notifier

    def boom(*a):
        raise OSError("refused")

    n = Notifier(["json://x"], "R1", send=boom)
    n.run_event("status", {"state": "done"})
    n.close()
    assert n.drain_failures() == ["notification 'run_done' failed: OSError: refused"]


def test_notify_urls_from_the_environment_are_kept_in_the_run_dir_not_inherited(tmp_path):
    from cpt_tui.notify import ENV, urls_for_run

    env = {ENV: "json://a\njson://b"}
    assert urls_for_run(["json://p"], tmp_path, env) == ["json://p", "json://a", "json://b"]
    assert ENV not in env and (tmp_path / "notify.json").stat().st_mode & 0o777 == 0o600
    assert urls_for_run(["json://p"], tmp_path, {}) == ["json://p", "json://a", "json://b"]  # a later supervisor


# --------------------------------------------------------------------------- the real run


@pytest.mark.timeout(400)
def test_a_run_with_a_nan_skip_sends_one_message_per_kind_and_a_refused_url_leaves_it_done(cpt_home, tmp_path, hook):
    pytest.importorskip("apprise")
    port, got = hook
    p = tiny_preset(tmp_path / "ntf.yaml", stages=(("s1", 10),), every=1000, name="ntf")
    doc = yaml.safe_load(p.read_text())
    doc["stages"][0]["nan_policy"] = "skip"
    doc["notify"] = [f"json://127.0.0.1:{port}/hook"]
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    bad = f"json://127.0.0.1:{refused_port()}/refused-token-123"
    env = {**cpt_home, "CPT_FAULT_NAN_STEP": "3"}
    r = run_cli(["--run", str(p), "--notify", bad], env, timeout=360)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    con = sqlite3.connect(env["CPT_TUI_DB"])
    run_id, status = con.execute("SELECT id, status FROM runs").fetchone()
    assert status == "done"
    kinds = collections.Counter(_kind(m) for _, m in got)
    assert set(kinds) >= {"nan", "stage_done", "run_done"} and set(kinds.values()) == {1}, kinds
    assert all(path == "/hook" for path, _ in got)
    by_kind = {_kind(m): dict(line.split(": ", 1) for line in m["message"].splitlines()) for _, m in got}
    assert by_kind["nan"]["run"] == run_id and by_kind["nan"]["stage"] == "s1" and by_kind["nan"]["step"] == "3"
    assert "non-finite" in by_kind["nan"]["reason"]
    assert by_kind["stage_done"]["step"] == "10" and by_kind["run_done"]["stage"] == "s1"
    assert got[-1][1]["type"] == "success" and run_id in got[-1][1]["title"]

    warns = [json.loads(d) for (d,) in con.execute(
        "SELECT data FROM events WHERE run_id = ? AND stage = '@run' AND type = 'warning'", [run_id])]
    assert [w for w in warns if w.get("kind") == "notify"], warns  # the refused deliveries, recorded
    dump = "\n".join(str(row) for row in con.iterdump())
    assert "refused-token-123" not in dump and f":{port}/hook" not in dump  # no URL in SQLite
