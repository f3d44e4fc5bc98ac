"""The CLI's exit status and signals, with real runs: a foreground `--run` (and an `attach`) of a run
that fails exits 1 naming the reason; SIGHUP / SIGTERM to a following CLI (its terminal went away)
detaches it — 128 + the signal — and leaves the run running under its supervisor."""

from __future__ import annotations

import signal
import subprocess
import sys

from cpt_tui.procs import proc_alive
from tests.demo_run import ROOT, run_cli, tiny_preset, wait_for
from tests.test_supervisor import events, run_row, wait_done


def test_foreground_run_and_attach_of_a_failing_run_exit_1(cpt_home, tmp_path):
    env = {**cpt_home, "CPT_FAULT_NAN_STEP": "3"}  # non-finite loss at step 3; nan_policy stop → the stage fails
    preset = tiny_preset(tmp_path / "p.yaml", [("s1", 20)])
    r = run_cli(["--run", str(preset), "--max-restarts", "0", "--telemetry-interval", "0"], env, timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    run_id = r.stdout.split()[1]
    row = run_row(env, run_id)
    assert row["status"] == "failed" and "step 3" in row["error"], row["error"]
    assert f"run {run_id} failed" in r.stderr and "step 3" in r.stderr
    a = run_cli(["attach", run_id], cpt_home, timeout=120)
    assert a.returncode == 1 and f"run {run_id} failed" in a.stderr, a.stdout[-2000:] + a.stderr


def test_sighup_and_sigterm_to_a_following_cli_detach(cpt_home, tmp_path):
    env = {**cpt_home, "CPT_FAULT_SLOW_S": "0.2"}
    preset = tiny_preset(tmp_path / "p.yaml", [("s1", 400)], every=10)

    def following(argv):
        p = subprocess.Popen([sys.executable, "-m", "cpt_tui.cli", *argv], env=env, cwd=ROOT,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = p.stdout.readline()  # "run ID  (DIR)"
        for line in p.stdout:  # it shows progress...
            if line.startswith("[s1] step"):
                return p, first.split()[1]
        raise AssertionError(p.communicate()[1])

    p, run_id = following(["--run", str(preset), "--telemetry-interval", "0"])
    sup = run_row(env, run_id)["pid"]
    p.send_signal(signal.SIGHUP)  # ...its terminal closes
    p.communicate(timeout=30)
    assert p.returncode == 128 + signal.SIGHUP
    n = len(events(env, run_id, "s1", "metric"))
    wait_for(lambda: len(events(env, run_id, "s1", "metric")) > n + 3, 60, "training to go on after SIGHUP")
    assert run_row(env, run_id)["status"] == "running" and run_row(env, run_id)["pid"] == sup and proc_alive(sup)

    p, attached = following(["attach", run_id])
    assert attached == run_id
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=30)
    assert p.returncode == 128 + signal.SIGTERM
    n = len(events(env, run_id, "s1", "metric"))
    wait_for(lambda: len(events(env, run_id, "s1", "metric")) > n + 3, 60, "training to go on after SIGTERM")
    assert run_row(env, run_id)["status"] == "running" and run_row(env, run_id)["pid"] == sup and proc_alive(sup)
    assert not [e for e in events(env, run_id, "s1", "status") if e["state"] == "stopped"]

    r = run_cli(["stop", run_id], env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert wait_done(env, run_id)["status"] == "stopped"

