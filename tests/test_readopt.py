"""Automatic re-adoption at start-up, through every entry point, of one real (slowed) local run whose
supervisor is killed -9 again and again: `cpt-tui runs`, the UI (`cpt-tui` with no command, a real process in
tmux), `cpt-tui --run OTHER --detach`, and a foreground `cpt-tui attach` that then follows the run to
its end. A `cpt-tui logs -f` started at the beginning follows it all and ends with the run. Each time a
new supervisor claims the run (its pid changes, an `adopted` event), the trainer is never relaunched,
and at the end the metric rows equal the events exactly."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from cpt_tui.procs import proc_alive
from tests.demo_run import ROOT, run_cli, tiny_preset, wait_for
from tests.hosts import require
from tests.test_supervisor import assert_rows_equal_events, db, events, run_row, start, trainer_pids, wait_done


def _adoptions(env, run_id) -> int:
    return sum(e["state"] == "adopted" for e in events(env, run_id, "@run", "status"))


def test_every_entry_point_readopts_an_orphaned_run(cpt_home, tmp_path):
    require(shutil.which("tmux") is not None, "tmux not installed (.ci/setup-hosts.sh)")
    # 0.25 s a step: the trainer is still running (15 s for the stage) when the test pauses it below,
    # however late the supervisor ingests the first step on a loaded machine.
    env = {**cpt_home, "CPT_FAULT_SLOW_S": "0.25"}
    preset = tiny_preset(tmp_path / "p.yaml", [("s1", 60)], every=20)
    run_id = start(env, preset, "--telemetry-interval", "0")
    run_dir = Path(run_row(env, run_id)["run_dir"])
    logs_out = open(tmp_path / "logs-f.out", "w+")
    logs = subprocess.Popen([sys.executable, "-m", "cpt_tui.cli", "logs", run_id, "-f"], env=env, cwd=ROOT,
                            stdout=logs_out, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: events(env, run_id, "s1", "metric"), 180, "the first training step")
    # The trainer is paused (SIGSTOP: a very slow step) while the supervisors come and go, so the run
    # outlives three adoptions however loaded this machine is; it continues for the fourth.
    (trainer,) = wait_for(lambda: trainer_pids(run_dir), 30, "the trainer process")
    os.kill(trainer, signal.SIGSTOP)
    n = 0
    session = f"cpt-readopt-{os.getpid()}"

    def orphan() -> int:
        nonlocal n
        row = run_row(env, run_id)
        assert row["status"] == "running" and proc_alive(row["pid"]), row
        os.kill(row["pid"], signal.SIGKILL)
        wait_for(lambda: not proc_alive(row["pid"]), 10, "the supervisor to die")
        n += 1
        return row["pid"]

    def adopted(old: int, how: str) -> None:
        wait_for(lambda: (lambda r: r["pid"] not in (None, old) and proc_alive(r["pid"]))(run_row(env, run_id)),
                 60, f"a new supervisor started by {how}")
        wait_for(lambda: _adoptions(env, run_id) >= n, 60, f"the run adopted through {how}")

    try:
        # 1. cpt-tui runs
        old = orphan()
        r = run_cli(["runs"], env, timeout=120)
        assert r.returncode == 0 and run_id in r.stdout, r.stdout + r.stderr
        adopted(old, "cpt-tui runs")
        # 2. the UI: `cpt-tui` (no command), a real process in a real terminal
        old = orphan()
        assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if k.startswith(("CPT_", "PYTHON", "HOME")))
        cmd = f"cd {shlex.quote(str(ROOT))} && exec env {assigns} TERM=xterm-256color {shlex.quote(sys.executable)} -m cpt_tui.cli"
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "180", "-y", "45", cmd], check=True, timeout=20)
        adopted(old, "the UI")
        wait_for(lambda: run_id in subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                                                  text=True).stdout, 60, "the UI to list the run")
        subprocess.run(["tmux", "kill-session", "-t", session], timeout=20)
        # 3. cpt-tui --run OTHER --detach (another preset)
        old = orphan()
        other = start(cpt_home, tiny_preset(tmp_path / "o.yaml", [("s1", 12)], name="tiny-other"),
                      "--telemetry-interval", "0")
        adopted(old, "cpt-tui --run OTHER --detach")
        # 4. a foreground attach: adopts, then follows to the end (exit 0)
        old = orphan()
        os.kill(trainer, signal.SIGCONT)
        r = run_cli(["attach", run_id], env, timeout=600)
        assert r.returncode == 0 and f"run {run_id} done" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
        assert run_row(env, run_id)["pid"] != old
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, timeout=20)
        if proc_alive(trainer):
            os.kill(trainer, signal.SIGCONT)
    row = wait_done(env, run_id)
    assert row["status"] == "done", row["error"]
    assert _adoptions(env, run_id) == 4
    states = [e["state"] for e in events(env, run_id, "@run", "status")]
    assert states.count("supervisor_started") == 5 and states[-1] == "done"
    with db(env) as con:
        s1 = con.execute("SELECT * FROM stages WHERE run_id = ? AND idx = 0", [run_id]).fetchone()
        assert (s1["attempts"], s1["restarts"], s1["status"]) == (1, 0, "done")  # adopted each time, never relaunched
    assert [e["step"] for e in events(env, run_id, "s1", "metric")] == list(range(1, 61))  # one trainer, every step once
    assert_rows_equal_events(env, run_id, ["s1"])
    assert wait_done(cpt_home, other)["status"] == "done"
    # logs -f followed the whole run and ended with it
    logs.wait(timeout=60)
    logs_out.seek(0)
    out = logs_out.read()
    assert logs.returncode == 0, out[-2000:]
    assert "==> supervisor.log <==" in out and "==> stages/s1/train.log <==" in out
    last = [l for l in (run_dir / "supervisor.log").read_text().splitlines() if l.strip()][-1]
    assert last in out
