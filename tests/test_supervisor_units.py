"""Fast supervisor / CLI checks without training: dry runs write nothing, liveness and pid reuse,
adoption of finished or vanished processes, secret scrubbing, validation before anything is created."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from cpt_tui import lifecycle as L
from cpt_tui import procs as P
from cpt_tui import redact as R
from cpt_tui.presets import Invalid
from tests.demo_run import run_cli, wait_for


def test_plan_commands_is_a_dry_run_that_writes_nothing(cpt_home, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for preset in ("ambari-lora", "dolmino-llama31-8b"):  # ZeRO-2 / ZeRO-3: a DeepSpeed config is involved
        r = subprocess.run([sys.executable, "-m", "cpt_tui.cli", "plan", preset, "--commands"], env=cpt_home,
                           cwd=cwd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "--deepspeed_config_file '<run_dir>/deepspeed." in r.stdout or \
               "--deepspeed_config_file <run_dir>/deepspeed." in r.stdout
    assert list(cwd.iterdir()) == []
    assert not os.path.exists(os.path.join(cpt_home["CPT_TUI_HOME"], "cpt-tui.db"))


def test_supervisor_alive_checks_pid_identity_and_heartbeat():
    me = {"id": "r1", "pid": os.getpid(), "host": socket.gethostname(), "heartbeat": time.time()}
    assert not P.supervisor_alive(me)  # alive, but not a supervisor of r1 (a reused pid)
    assert not P.supervisor_alive({**me, "pid": None})
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "cpt_tui.supervisor", "r1"])
    try:
        wait_for(lambda: "cpt_tui.supervisor" in P._cmdline(p.pid), 10, "the child to exec")
        assert P.supervisor_alive({**me, "pid": p.pid})
        assert not P.supervisor_alive({**me, "id": "r2", "pid": p.pid})
    finally:
        p.kill()
        p.wait()
    assert not P.supervisor_alive({**me, "pid": p.pid})
    other = {**me, "host": "elsewhere"}  # another host: only the heartbeat can tell
    assert P.supervisor_alive(other)
    assert not P.supervisor_alive({**other, "heartbeat": time.time() - P.STALE_S - 1})


def test_adopted_proc_reports_exit_file_or_lost(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", P._KEEPER, str(tmp_path / "exit"), sys.executable, "-c",
                          "import sys; sys.exit(7)"], start_new_session=True)
    proc = P.Proc("local", p.pid, P.proc_start(p.pid), time.time(), str(tmp_path / "exit"))
    p.wait()
    assert proc.poll() == 7  # read from the keeper's exit file, as a re-adopting supervisor does
    q = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    lost = P.Proc("local", q.pid, P.proc_start(q.pid), time.time(), str(tmp_path / "none"))
    assert lost.poll() is None
    assert P.Proc("local", q.pid, 1, time.time(), None).poll() == P.LOST  # same pid, other start time: not ours
    q.kill()
    q.wait()
    assert lost.poll() == P.LOST
    assert P.Proc(**lost.to_json()).to_json() == lost.to_json()


def test_scrub_and_secret_values(monkeypatch):
    env = {"HF_TOKEN": "hf_abcdef", "MY_PASSWORD": "pw12345", "PATH": "/usr/bin", "API_KEY": "xy"}
    vals = R.secret_values(None, env)
    assert vals == ["hf_abcdef", "pw12345"]  # too-short values are not worth masking everywhere
    assert R.scrub("token hf_abcdef and pw12345 in /usr/bin", vals) == "token *** and *** in /usr/bin"


def test_start_detached_validates_before_creating_anything(cpt_home, tmp_path, monkeypatch):
    for k in ("CPT_TUI_HOME", "CPT_TUI_CACHE", "CPT_TUI_DB"):
        monkeypatch.setenv(k, cpt_home[k])
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {config: {}}\nsources: {a: {path: builtin:stdlib-prose}}\nstages: []\n")
    db = tmp_path / "db.sqlite"
    with pytest.raises(Invalid, match="bad.yaml"):
        L.start_detached(bad, db)
    with pytest.raises(Invalid, match="no such preset"):
        L.start_detached("no-such-preset", db)
    with pytest.raises(TypeError):
        L.start_detached("tiny-demo", db, max_restart=1)
    assert not db.exists()


def test_commands_on_unknown_runs_exit_2(cpt_home):
    for cmd in ("attach", "stop", "resume", "logs", "show"):
        r = run_cli([cmd, "no-such-run"], cpt_home, timeout=60)
        assert r.returncode == 2 and "no such run" in r.stderr, (cmd, r.stderr)
