"""The lifecycle of an SSH run, with real processes: the manager (CLI, detached supervisor, ssh clients)
runs in the first of two network namespaces and trains on node-a, a real sshd in it (tests/hosts.py).

- kill -9 of the supervisor: its ssh channel closes, the node's guard SIGTERMs the trainer (it
  checkpoints and exits); `cpt-tui runs` starts a new supervisor that waits for the old ssh processes,
  then relaunches the stage from that checkpoint (attempt 2). The supervisor's death is not a crash:
  the stage's restart counter stays 0, no `restarting` event; the run ends `done` with every step once,
  the metric rows equal the events.
- `cpt-tui stop RUN` reaches the remote trainer (through the closed channel and the guard): a complete
  step-N checkpoint, the trainer's `stopped` status, the run `stopped`; `cpt-tui resume RUN` finishes it,
  and every loss equals that of an uninterrupted run of the same preset, bit for bit (fp32, CPU, one
  process: the local launcher's run is the reference).

The nodes share this filesystem, so the run directory is shared (a requirement, see README).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from cpt_tui.procs import proc_alive
from engine.events import read_events
from engine.layout import StageLayout, latest_checkpoint
from tests.demo_run import ROOT, tiny_preset, wait_for
from tests.test_supervisor import assert_rows_equal_events, db, events, run_row, trainer_pids, wait_done

PY = sys.executable


def _cluster(nn, slow: str) -> dict:
    """One node (node-a) of the namespaces, one process, CPU; the trainer slowed by `slow` s per step."""
    node = {"host": "node-a", "workdir": str(ROOT), "python": PY,
            "env": {"PYTHONPATH": str(ROOT), "CPT_FAULT_SLOW_S": slow, "TOKENIZERS_PARALLELISM": "false",
                    "HF_HUB_OFFLINE": "1"}}
    return {"kind": "ssh", "processes_per_node": 1, "device": "cpu", "ssh_options": ["-F", str(nn.ssh_config)],
            "nodes": [node]}


def _cli(nn, env, *args, timeout=120) -> subprocess.CompletedProcess:
    """`cpt-tui ARGS` inside the first namespace, where node-a is reachable (a supervisor it starts stays there)."""
    return nn.run([PY, "-m", "cpt_tui.cli", *args], env=env, cwd=ROOT, timeout=timeout)


def _start(nn, env, preset: Path) -> str:
    r = _cli(nn, env, "--run", str(preset), "--detach", "--telemetry-interval", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    run_id = r.stdout.strip()
    assert run_id and "\n" not in run_id
    return run_id


def _file_events(run_dir: Path, stage: str = "s1") -> list[dict]:
    return read_events(StageLayout(run_dir / "stages" / stage).events)[0]


def _run_events(env, run_id) -> list[dict]:
    """The '@run' stream with each event's timestamp."""
    with db(env) as con:
        return [{**json.loads(r["data"]), "ts": r["ts"]} for r in con.execute(
            "SELECT ts, data FROM events WHERE run_id = ? AND stage = '@run' ORDER BY rowid", [run_id])]


def _stage_row(env, run_id) -> dict:
    with db(env) as con:
        return dict(con.execute("SELECT * FROM stages WHERE run_id = ? AND idx = 0", [run_id]).fetchone())


def _failure(env, run_id) -> str:
    run_dir = Path(run_row(env, run_id)["run_dir"])
    logs = [run_dir / "supervisor.log", run_dir / "stages" / "s1" / "train.log"]
    return "\n".join(f"==> {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:])
                     for p in logs if p.exists())


def test_ssh_supervisor_death_relaunches_without_counting_a_restart(netns_nodes, cpt_home, tmp_path):
    nn, env, steps = netns_nodes, cpt_home, 60
    preset = tiny_preset(tmp_path / "p.yaml", [("s1", steps)], every=5, cluster=_cluster(nn, "0.2"))
    run_id = _start(nn, env, preset)
    run_dir = Path(run_row(env, run_id)["run_dir"])
    wait_for(lambda: events(env, run_id, "s1", "checkpoint"), 180, "a first checkpoint (ingested)")
    row = run_row(env, run_id)
    sup = row["pid"]
    assert row["status"] == "running" and proc_alive(sup), row
    (trainer,) = wait_for(lambda: trainer_pids(run_dir), 10, "the remote trainer process")
    (ssh_client,) = json.loads(_stage_row(env, run_id)["procs"])
    os.kill(sup, signal.SIGKILL)
    wait_for(lambda: not proc_alive(sup), 10, "the supervisor to die")

    # Re-adoption at once, while the old ssh client and its trainer may still be ending.
    r = _cli(nn, env, "runs")
    assert r.returncode == 0 and run_id in r.stdout, r.stdout + r.stderr
    wait_for(lambda: run_row(env, run_id)["pid"] not in (None, sup), 60, "a new supervisor started by `cpt-tui runs`")
    row = wait_done(env, run_id, 180)
    assert row["status"] == "done", (row["error"], _failure(env, run_id))
    assert not proc_alive(trainer) and not proc_alive(ssh_client["pid"], ssh_client["start"])
    assert trainer_pids(run_dir) == []

    # The supervisor's death is not a crash: no restart counted, the stage relaunched once (attempt 2).
    s1 = _stage_row(env, run_id)
    assert (s1["status"], s1["attempts"], s1["restarts"]) == ("done", 2, 0), s1
    run_evs = _run_events(env, run_id)
    states = [e["state"] for e in run_evs if "state" in e]
    assert "restarting" not in states and states[-1] == "done", states
    sups = [e for e in run_evs if e.get("state") == "supervisor_started"]
    assert [s["adopted"] for s in sups] == [False, True]  # the second supervisor adopted the running run
    launches = [e for e in run_evs if e.get("state") == "stage_started"]
    assert [e["attempt"] for e in launches] == [1, 2]

    # The node's guard ended the first trainer with its channel: SIGTERM, a checkpoint of its last step,
    # exit; only then was the stage relaunched, from that checkpoint, and it went on at the next step.
    evs = _file_events(run_dir)
    (stopped,) = [e for e in evs if e["type"] == "status" and e["state"] == "stopped"]
    assert stopped["reason"] == "SIGTERM", stopped
    k = stopped["step"]
    assert 5 <= k < steps
    assert any(e["type"] == "checkpoint" and e["step"] == k for e in evs)
    assert launches[1]["ts"] > stopped["ts"]  # the new supervisor waited for the old trainer
    resumed = [e for e in evs if e["type"] == "status" and e["state"] == "running" and e.get("resumed_from")]
    assert len(resumed) == 1 and Path(resumed[0]["resumed_from"]).name == f"step-{k}", resumed
    i = evs.index(resumed[0])
    assert next(e for e in evs[i:] if e["type"] == "metric")["step"] == k + 1

    # Each step once, in the events and in SQLite; the rows equal the events.
    assert [e["step"] for e in evs if e["type"] == "metric"] == list(range(1, steps + 1))
    assert_rows_equal_events(env, run_id, ["s1"])
    with db(env) as con:
        att = [tuple(r) for r in con.execute("SELECT attempt, start_step FROM attempts WHERE run_id = ? AND stage = "
                                             "'s1' ORDER BY attempt", [run_id])]
        assert att == [(1, 0), (2, k)]
        by_attempt = dict(con.execute("SELECT attempt, COUNT(*) FROM metrics WHERE run_id = ? AND stage = 's1' "
                                      "GROUP BY attempt",
                                      [run_id]).fetchall())
        assert by_attempt == {1: k, 2: steps - k}


def _losses(env, run_id) -> dict[int, float]:
    with db(env) as con:
        return dict(con.execute("SELECT step, loss FROM metrics WHERE run_id = ? AND stage = 's1'", [run_id]))


def test_cpt_tui_stop_of_an_ssh_run_checkpoints_and_resumes_exactly(netns_nodes, cpt_home, tmp_path):
    nn, env, steps = netns_nodes, cpt_home, 40
    # The reference: the same model, data and schedule, uninterrupted, one process on the local launcher.
    ref_preset = tiny_preset(tmp_path / "ref.yaml", [("s1", steps)], every=1000,
                             cluster={"processes_per_node": 1, "device": "cpu"})
    r = _cli(nn, env, "--run", str(ref_preset), "--telemetry-interval", "0", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = _losses(env, r.stdout.split()[1])
    assert sorted(ref) == list(range(1, steps + 1))

    preset = tiny_preset(tmp_path / "p.yaml", [("s1", steps)], every=1000, cluster=_cluster(nn, "0.3"))
    run_id = _start(nn, env, preset)
    run_dir = Path(run_row(env, run_id)["run_dir"])
    sl = StageLayout(run_dir / "stages" / "s1")
    wait_for(lambda: len(events(env, run_id, "s1", "metric")) >= 3, 180, "three training steps")
    (trainer,) = wait_for(lambda: trainer_pids(run_dir), 10, "the remote trainer process")

    r = _cli(nn, env, "stop", run_id)
    assert r.returncode == 0 and f"run {run_id}: stopped" in r.stdout, r.stdout + r.stderr
    assert run_row(env, run_id)["status"] == "stopped"
    assert not proc_alive(trainer) and trainer_pids(run_dir) == []  # the stop reached the node
    (stopped,) = [e for e in events(env, run_id, "s1", "status") if e["state"] == "stopped"]
    assert stopped["reason"] == "SIGTERM" and stopped["exit_code"] == 75, stopped
    n = stopped["step"]
    assert 3 <= n < steps
    ck = latest_checkpoint(sl.checkpoints)
    assert ck == sl.checkpoint(n), (ck, n)  # the stop's checkpoint (none is due before step 1000)
    assert json.loads((ck / "trainer_state.json").read_text())["step"] == n
    assert {p.name for p in ck.iterdir()} >= {"trainer_state.json", "model.safetensors", "optimizer.pt",
                                             "rng-rank0.pt"}
    assert [e["step"] for e in events(env, run_id, "s1", "checkpoint")] == [n]
    assert [e["state"] for e in events(env, run_id, "@run", "status")][-1] == "stopped"
    assert _stage_row(env, run_id)["status"] == "stopped"

    r = _cli(nn, env, "resume", run_id)
    assert r.returncode == 0 and "resumed" in r.stdout, r.stdout + r.stderr
    row = wait_done(env, run_id, 180)
    assert row["status"] == "done", (row["error"], _failure(env, run_id))

    evs = _file_events(run_dir)
    (resumed,) = [e for e in evs if e["type"] == "status" and e["state"] == "running" and e.get("resumed_from")]
    assert Path(resumed["resumed_from"]).name == f"step-{n}"
    assert [e["step"] for e in evs if e["type"] == "metric"] == list(range(1, steps + 1))  # no step twice
    assert_rows_equal_events(env, run_id, ["s1"])
    got = _losses(env, run_id)
    assert sorted(got) == list(range(1, steps + 1))
    # bit for bit: the steps before the stop, and the resumed ones
    assert [got[s] for s in range(1, n + 1)] == [ref[s] for s in range(1, n + 1)]
    assert [got[s] for s in range(n + 1, steps + 1)] == [ref[s] for s in range(n + 1, steps + 1)]
    s1 = _stage_row(env, run_id)
    assert (s1["status"], s1["attempts"], s1["restarts"]) == ("done", 2, 0), s1
