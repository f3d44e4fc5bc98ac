"""The detached supervisor, for real: `cpt-tui --run` of a tiny preset through the CLI, real trainers
under `accelerate launch`, real SIGKILLs, a real pseudo-terminal that is closed.

- kill -9 of the supervisor mid-run: training goes on, `cpt-tui resume` re-adopts the running trainer,
  the metric rows equal the events exactly;
- kill -9 of the trainer: restarted from its last checkpoint up to the limit, then failed with the reason;
- the terminal that started `--run --detach` (and an `attach` following it) closes: the run goes on
  (and completes, after the supervisor kill above);
- Ctrl-C of a foreground `--run` without a terminal detaches; `stop` checkpoints; `resume` finishes it.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sqlite3
import subprocess
import sys
import termios
import time
from pathlib import Path

from cpt_tui.procs import proc_alive
from engine.events import read_events
from tests.demo_run import ROOT, run_cli, tiny_preset, wait_for
from tests.hosts import procs_matching

TERMINAL = ("done", "failed", "stopped")


def db(env) -> sqlite3.Connection:
    con = sqlite3.connect(env["CPT_TUI_DB"], timeout=30)
    con.row_factory = sqlite3.Row
    return con


def run_row(env, run_id) -> dict:
    with db(env) as con:
        return dict(con.execute("SELECT * FROM runs WHERE id = ?", [run_id]).fetchone())


def events(env, run_id, stage=None, type=None) -> list[dict]:
    q, args = "SELECT stage, seq, type, data FROM events WHERE run_id = ?", [run_id]
    if stage:
        q, args = q + " AND stage = ?", args + [stage]
    if type:
        q, args = q + " AND type = ?", args + [type]
    with db(env) as con:
        return [{**json.loads(r["data"]), "stage": r["stage"], "seq": r["seq"], "type": r["type"]}
                for r in con.execute(q + " ORDER BY rowid", args)]


def start(env, preset: Path, *extra: str) -> str:
    r = run_cli(["--run", str(preset), "--detach", *extra], env, timeout=120)
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.strip()
    assert run_id and "\n" not in run_id  # --detach prints the run id only
    return run_id


def wait_done(env, run_id, timeout=240) -> dict:
    return wait_for(lambda: (lambda r: r if r["status"] in TERMINAL else None)(run_row(env, run_id)), timeout,
                    f"run {run_id} to end")


def assert_rows_equal_events(env, run_id, stages):
    run_dir = Path(run_row(env, run_id)["run_dir"])
    with db(env) as con:
        for stage in stages:
            evs, _ = read_events(run_dir / "stages" / stage / "events.jsonl")
            want = [(e["seq"], e["step"], e["loss"]) for e in evs if e["type"] == "metric"]
            rows = [tuple(r) for r in con.execute(
                "SELECT seq, step, loss FROM metrics WHERE run_id = ? AND stage = ? ORDER BY seq", [run_id, stage])]
            assert rows == want and len(rows) >= 10, stage  # none lost, none duplicated
            n = con.execute("SELECT COUNT(*) FROM events WHERE run_id = ? AND stage = ?", [run_id, stage]).fetchone()[0]
            assert n == len(evs)


def trainer_pids(run_dir: Path) -> list[int]:
    """The engine.train processes of a run (not accelerate launch, not the keeper)."""
    return procs_matching(lambda d, argv: b"engine.train" in argv and b"accelerate.commands.launch" not in argv
                          and b"-c" not in argv and any(str(run_dir).encode() in a for a in argv) and proc_alive(int(d)))


def start_in_terminal_then_close_it(env, preset: Path, *extra: str) -> str:
    """In a real pseudo-terminal (its own session): `cpt-tui --run PRESET --detach`, then `cpt-tui attach`
    following the run like a user watching it. Once progress shows, the terminal is closed (SIGHUP to
    its session) and everything still in that session is killed. Returns the run id."""
    master, slave = os.openpty()

    def controlling_tty():  # the child leads a new session (start_new_session): make the pty its terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    script = ('id=$("$0" -m cpt_tui.cli --run "$1" --detach "$2" "$3") && echo "RUN $id" && '
              'exec "$0" -m cpt_tui.cli attach "$id"')
    term = subprocess.Popen(["sh", "-c", script, sys.executable, str(preset), *extra], stdin=slave, stdout=slave,
                            stderr=slave, env=env, cwd=ROOT, start_new_session=True, preexec_fn=controlling_tty)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 180
        while b"[s1] step" not in out and time.monotonic() < deadline:  # attach is showing progress
            try:
                out += os.read(master, 4096)
            except OSError:
                break
        assert b"[s1] step" in out, out.decode(errors="replace")
        return out.split(b"RUN ", 1)[1].split()[0].decode()
    finally:
        os.close(master)  # the terminal goes away: SIGHUP to its session
        try:
            os.killpg(term.pid, signal.SIGKILL)  # and whatever is left in it dies
        except ProcessLookupError:
            pass
        term.wait(10)


def test_kill9_supervisor_training_continues_and_resume_readopts(cpt_home, tmp_path):
    """Also: the terminal that started `--run --detach` (and an `attach`) closes first; the run goes on."""
    # Unslowed, the 240 steps of s1 take ~1 s: under load the trainer could finish the stage before the
    # supervisor has ingested its first checkpoint and is killed. Steps 21.. take 0.1 s more (s1: +22 s).
    env = {**cpt_home, "CPT_FAULT_SLOW_S": "0.1", "CPT_FAULT_SLOW_STEPS": ",".join(map(str, range(21, 241)))}
    preset = tiny_preset(tmp_path / "p.yaml", [("s1", 240), ("s2", 30)])
    run_id = start_in_terminal_then_close_it(env, preset, "--telemetry-interval", "1")
    wait_for(lambda: events(env, run_id, "s1", "checkpoint"), 180, "a first checkpoint in stage s1")
    row = run_row(env, run_id)
    sup = row["pid"]
    with db(env) as con:
        (keeper,) = json.loads(con.execute("SELECT procs FROM stages WHERE run_id = ? AND idx = 0",
                                           [run_id]).fetchone()[0])
    os.kill(sup, signal.SIGKILL)
    wait_for(lambda: not proc_alive(sup), 10, "the supervisor to die")

    # Unsupervised, the trainer goes on writing events.
    ev_file = Path(row["run_dir"]) / "stages" / "s1" / "events.jsonl"
    n0 = len(read_events(ev_file)[0])
    wait_for(lambda: len(read_events(ev_file)[0]) >= n0 + 10, 60, "the trainer to go on without its supervisor")
    assert proc_alive(keeper["pid"], keeper["start"])
    assert run_row(env, run_id)["status"] == "running"

    r = run_cli(["resume", run_id], env, timeout=120)
    assert r.returncode == 0 and "resumed" in r.stdout, r.stdout + r.stderr
    assert run_row(env, run_id)["pid"] != sup
    row = wait_done(env, run_id)
    assert row["status"] == "done", row["error"]
    assert_rows_equal_events(env, run_id, ["s1", "s2"])
    states = [e["state"] for e in events(env, run_id, "@run", "status")]
    assert states.count("supervisor_started") == 2 and "adopted" in states and states[-1] == "done"
    with db(env) as con:
        s1 = con.execute("SELECT * FROM stages WHERE run_id = ? AND idx = 0", [run_id]).fetchone()
        assert (s1["attempts"], s1["restarts"], s1["status"]) == (1, 0, "done")  # adopted, not relaunched
        # telemetry without a GPU: host samples, and no error anywhere
        host = con.execute("SELECT COUNT(*) FROM telemetry WHERE run_id = ? AND node = 'local' AND kind = 'host'",
                           [run_id]).fetchone()[0]
        assert host >= 5
        assert con.execute("SELECT COUNT(*) FROM telemetry WHERE run_id = ? AND kind = 'gpu'", [run_id]).fetchone()[0] == 0
        assert con.execute("SELECT COUNT(*) FROM events WHERE run_id = ? AND type = 'error'", [run_id]).fetchone()[0] == 0
        assert con.execute("SELECT step FROM latest_metrics WHERE run_id = ?", [run_id]).fetchone()[0] == 30
    assert "telemetry" not in Path(row["run_dir"], "supervisor.log").read_text().lower().replace(
        "telemetry_interval", "")  # the sampler logged nothing (no errors)


def test_kill9_trainer_resumes_from_checkpoint_until_the_restart_limit(cpt_home, tmp_path):
    # Unslowed, the 600 steps take ~3 s: under load an attempt could end before it is killed. +0.05 s a
    # step (30 s an attempt) costs ~2 s here: both kills come within a few dozen steps.
    env = {**cpt_home, "CPT_FAULT_SLOW_S": "0.05"}
    preset = tiny_preset(tmp_path / "p.yaml", [("s1", 600)], every=10)
    run_id = start(env, preset, "--max-restarts", "1", "--restart-backoff", "0.5", "--telemetry-interval", "0")
    run_dir = Path(run_row(env, run_id)["run_dir"])
    wait_for(lambda: events(env, run_id, "s1", "checkpoint"), 180, "a checkpoint")
    (pid,) = wait_for(lambda: trainer_pids(run_dir), 10, "the trainer process")
    os.kill(pid, signal.SIGKILL)

    def resumed():
        return [e for e in events(env, run_id, "s1", "status") if e["state"] == "running" and e.get("resumed_from")]
    (running,) = wait_for(resumed, 120, "the stage to be restarted from its checkpoint")
    (restart,) = [e for e in events(env, run_id, "@run", "status") if e["state"] == "restarting"]
    assert restart["restart"] == 1 and restart["max_restarts"] == 1 and "exit" in restart["reason"]
    # It resumed from the last checkpoint written before the kill, and goes on from the step after it.
    evs, _ = read_events(run_dir / "stages" / "s1" / "events.jsonl")
    i = next(k for k, e in enumerate(evs) if e["type"] == "status" and e.get("resumed_from"))
    last_ck = [e for e in evs[:i] if e["type"] == "checkpoint"][-1]
    # the newest complete checkpoint on disk: the last one announced, or the next one when the kill came
    # after its directory was committed but before its event was written (seen under load)
    resumed = Path(running["resumed_from"])
    every = 10
    assert resumed.parent == Path(last_ck["path"]).parent and restart["resume_from"] == resumed.name
    assert resumed.name in (f"step-{last_ck['step']}", f"step-{last_ck['step'] + every}"), (resumed, last_ck)
    last_ck = {"step": int(resumed.name.removeprefix("step-"))}
    (pid2,) = wait_for(lambda: [p for p in trainer_pids(run_dir) if p != pid], 30, "the new trainer")
    wait_for(lambda: any(e["type"] == "metric" for e in read_events(run_dir / "stages" / "s1" / "events.jsonl")[0][i:]),
             60, "a metric after the restart")
    first_after = next(e for e in read_events(run_dir / "stages" / "s1" / "events.jsonl")[0][i:] if e["type"] == "metric")
    assert first_after["step"] == last_ck["step"] + 1
    os.kill(pid2, signal.SIGKILL)

    row = wait_done(env, run_id, 120)
    assert row["status"] == "failed"
    assert "restart limit 1 reached" in row["error"] and "'s1'" in row["error"], row["error"]
    with db(env) as con:
        s1 = con.execute("SELECT * FROM stages WHERE run_id = ? AND idx = 0", [run_id]).fetchone()
        assert (s1["status"], s1["attempts"], s1["restarts"]) == ("failed", 2, 1)  # 1 restart, then the limit
    assert events(env, run_id, "@run", "status")[-1]["state"] == "failed"
    r = run_cli(["show", run_id], env)
    assert "status failed" in r.stdout and "restart limit" in r.stdout
    assert trainer_pids(run_dir) == []


def test_ctrl_c_without_terminal_detaches_then_stop_and_resume(cpt_home, tmp_path):
    # Each step takes ≥ 0.5 s until the stop (40 s for the stage), so it is still running when Ctrl-C and
    # `stop` arrive, even when a loaded machine starves the following CLI for a while (seen in CI at
    # 0.15 s: the CLI caught up after the run had ended, and exited 0). The resumed run goes at full speed.
    env = {**cpt_home, "CPT_FAULT_SLOW_S": "0.5"}
    preset = tiny_preset(tmp_path / "p.yaml", [("s1", 80)], every=10)
    # SIGINT at its default in the child: a shell without job control starts background commands (e.g. a
    # CI script run with `&`) with SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
    p = subprocess.Popen([sys.executable, "-m", "cpt_tui.cli", "--run", str(preset), "--telemetry-interval", "0"],
                         env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    run_id = p.stdout.readline().split()[1]
    for line in p.stdout:  # the foreground run shows progress...
        if line.startswith("[s1] step"):
            break
    p.send_signal(signal.SIGINT)  # ...and Ctrl-C without a terminal detaches
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130 and "detached" in err and f"cpt-tui stop {run_id}" in err
    assert run_row(env, run_id)["status"] == "running"
    wait_for(lambda: events(env, run_id, "s1", "checkpoint"), 60, "a checkpoint")

    r = run_cli(["stop", run_id], env, timeout=120)
    assert r.returncode == 0 and "stopped" in r.stdout, r.stdout + r.stderr
    stopped = [e for e in events(env, run_id, "s1", "status") if e["state"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["reason"] == "SIGTERM"  # the trainer checkpointed and exited
    assert run_row(env, run_id)["status"] == "stopped"
    r = run_cli(["logs", run_id], env)
    assert "==> supervisor.log <==" in r.stdout and "==> stages/s1/train.log <==" in r.stdout

    r = run_cli(["resume", run_id], cpt_home, timeout=120)  # its supervisor and trainer: not slowed
    assert r.returncode == 0, r.stderr
    r = run_cli(["attach", run_id], env, timeout=300)  # follows to the end
    assert r.returncode == 0 and f"run {run_id} done" in r.stdout, r.stdout[-2000:] + r.stderr
    assert_rows_equal_events(env, run_id, ["s1"])
    evs, _ = read_events(Path(run_row(env, run_id)["run_dir"]) / "stages" / "s1" / "events.jsonl")
    steps = [e["step"] for e in evs if e["type"] == "metric"]
    assert steps == list(range(1, 81))  # resumed exactly after the stop's checkpoint: no step twice
