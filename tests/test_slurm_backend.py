"""The Slurm launch backend on a real 2-node Slurm 22.05 cluster (tests/slurm_cluster.py, notes in
tests/SLURM-NOTES.md), through the backend directly and through the CLI:

- the generated batch script: a real 2-rank gloo world across the two slurmds (machine ranks 0/1 from
  $SLURM_NODEID, the main address from the first node's NodeAddr), values with spaces and shell syntax
  in paths and env reaching the job literally (nothing executed);
- a 2-stage run of 2-node jobs to the end (world size 2, machine ranks 0 and 1, metrics = events,
  telemetry per node, the export reloads); its per-step losses are the reference for
- `cpt-tui stop` mid-stage (checkpoint, job gone, run stopped) and `cpt-tui resume` (bit-exact losses);
- `scancel -s KILL` of the job → resubmitted, resumed from its checkpoint (a restart);
  a tiny time limit → TERM before it, checkpoint, resubmitted without counting a crash, completes;
- kill -9 of the supervisor → the job runs on, a new supervisor adopts it by job id, rows = events;
- a PENDING job shown with Slurm's reason; an invalid partition → exit 2 at preflight naming it.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import time
import uuid
from pathlib import Path

import pytest

from cpt_tui.backends import backend_for
from cpt_tui.procs import proc_alive
from engine.events import read_events
from engine.layout import StageLayout
from engine.spec import ClusterSpec, StageSpec
from tests.demo_run import ROOT, cli_env, run_cli, tiny_preset, wait_for
from tests.hosts import free_port
from tests.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (the fixture)
from tests.test_supervisor import assert_rows_equal_events, db, events, run_row, start, wait_done

pytestmark = pytest.mark.timeout(600)
PY = sys.executable
STAGES = (("s1", 40), ("s2", 16))


@pytest.fixture(autouse=True)
def _empty_queue(slurm_cluster: SlurmCluster):
    assert slurm_cluster.cancel_all(), slurm_cluster.run(["squeue"]).stdout
    yield
    assert slurm_cluster.cancel_all(), slurm_cluster.run(["squeue"]).stdout


def slurm_cl(c: SlurmCluster, nodes: int = 2, env: dict | None = None, port: int | None = -1, **slurm) -> dict:
    """`port`: -1 a free port; None the backend's default (from the job id)."""
    return {"kind": "slurm", "processes_per_node": 1, "main_process_port": free_port() if port == -1 else port,
            "env": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})},
            "slurm": {"nodes": nodes, "partition": c.partition, "python": PY, "time": "0:10:00", **slurm}}


def with_slurm(env: dict, c: SlurmCluster) -> dict:
    return {**env, "SLURM_CONF": c.env["SLURM_CONF"]}


def stage_row(env, run_id, idx=0) -> dict:
    with db(env) as con:
        return dict(con.execute("SELECT * FROM stages WHERE run_id = ? AND idx = ?", [run_id, idx]).fetchone())


def losses(run_dir: Path, stage: str) -> dict[int, float]:
    """step → loss; a step done twice (after a restart) must give the same loss."""
    out: dict[int, float] = {}
    for e in read_events(run_dir / "stages" / stage / "events.jsonl")[0]:
        if e["type"] == "metric":
            assert out.setdefault(e["step"], e["loss"]) == e["loss"], (stage, e["step"])
    return out


def job_of(env, run_id, idx=0) -> str:
    procs = json.loads(stage_row(env, run_id, idx)["procs"] or "[]")
    return str(procs[0]["pid"]) if procs else ""


# --------------------------------------------------------------------------- the script, directly


def test_script_two_rank_world_and_literal_values(slurm_cluster: SlurmCluster, tmp_path):
    """dist_probe under the generated script: 2 ranks on cn1/cn2, hostile paths and env literal."""
    c = slurm_cluster
    uniq = uuid.uuid4().hex[:8]
    pwned = Path(f"/tmp/pwned_{uniq}")
    run_dir = tmp_path / f"a b; touch {pwned}" / "run $(touch {pwned}) `x`"
    evil = f"$(touch {pwned}) `touch {pwned}`; \"'\\ $HOME"
    cluster = ClusterSpec(**slurm_cl(c, env={"EVIL": evil, "SPACED": "two  words"}, port=None))
    b = backend_for(cluster, local_env=c.env)
    b.preflight()
    stage = StageSpec(name="probe", mixture={"weights": {"x": 1.0}, "tokens": 1}, seq_len=8, micro_batch_size=1,
                      global_batch_size=2, precision="fp32")
    sl = StageLayout(run_dir / "stages" / "probe")
    sl.root.mkdir(parents=True)
    spec = sl.root / "probe.json"
    spec.write_text(json.dumps({"out": str(sl.root / "out"), "env": ["EVIL", "SPACED", "SLURMD_NODENAME"]}))
    cmds = b.commands(stage, str(spec), str(run_dir), module="tests.dist_probe")
    (p,) = b.start(cmds, sl, 1)
    assert sl.sbatch_script(1).exists() and oct(sl.sbatch_script(1).stat().st_mode)[-3:] == "700"
    deadline = time.monotonic() + 120
    while b.poll([p]) == [None] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b.poll([p]) == [0], sl.log.read_text() + c.log_tails()
    assert c.job(str(p.pid))["JobState"] == "COMPLETED"
    recs = [json.loads((sl.root / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in recs] == [2, 2] and recs[0]["sum"] == 3.0 and recs[0]["backend"] == "gloo"
    assert {r["env"]["SLURMD_NODENAME"] for r in recs} == {"cn1", "cn2"}
    assert all(r["env"]["EVIL"] == evil and r["env"]["SPACED"] == "two  words" for r in recs)
    log = sl.log.read_text()
    assert "node cn1 machine_rank 0" in log and "node cn2 machine_rank 1" in log, log
    assert f"main 127.0.0.1 port {10000 + p.pid % 20000}\n" in log  # the first node's NodeAddr, not its
    # (unresolvable) name; without cluster.main_process_port, the port follows from the job id
    assert not pwned.exists()
    assert sl.job_exit(1).read_text().strip() == "0"


# --------------------------------------------------------------------------- whole runs through the CLI


class Ref:
    env: dict
    run_id: str
    run_dir: Path
    losses: dict


@pytest.fixture(scope="module")
def ref_run(slurm_cluster: SlurmCluster, tmp_path_factory, shared_cache) -> Ref:
    """A 2-stage preset, each stage a 2-node job, run to the end in a home whose path has spaces and
    shell syntax; its per-step losses are the reference of the stop/resume test."""
    c = slurm_cluster
    assert c.cancel_all()
    base = tmp_path_factory.mktemp("slurm-ref")
    pwned = base / "pwned"
    home = base / f"home a b; touch {pwned}" / "$(touch x)"
    home.mkdir(parents=True)
    env = with_slurm(cli_env(home, shared_cache), c)
    preset = tiny_preset(base / "p.yaml", STAGES, every=8, cluster=slurm_cl(c), micro=4, name="tiny-slurm")
    t0 = time.monotonic()
    r = run_cli(["--run", str(preset), "--telemetry-interval", "1"], env, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + c.log_tails()
    ref = Ref()
    ref.env, ref.run_id = env, r.stdout.split()[1]
    ref.run_dir = Path(run_row(env, ref.run_id)["run_dir"])
    ref.losses = losses(ref.run_dir, "s1")
    ref.seconds = time.monotonic() - t0
    assert not pwned.exists() and not (ROOT / "x").exists()
    return ref


def test_two_stage_run_of_two_node_jobs(ref_run: Ref, slurm_cluster: SlurmCluster):
    env, run_id, run_dir = ref_run.env, ref_run.run_id, ref_run.run_dir
    assert run_row(env, run_id)["status"] == "done"
    assert_rows_equal_events(env, run_id, ["s1", "s2"])
    for idx, (stage, steps) in enumerate(STAGES):
        evs, _ = read_events(run_dir / "stages" / stage / "events.jsonl")
        (st,) = [e for e in evs if e["type"] == "status" and e["state"] == "starting"]
        assert st["world_size"] == 2  # a real 2-rank gloo world
        assert [e["step"] for e in evs if e["type"] == "metric"] == list(range(1, steps + 1))
        log = (run_dir / "stages" / stage / "train.log").read_text()
        assert "node cn1 machine_rank 0" in log and "node cn2 machine_rank 1" in log, log[-2000:]
        row = stage_row(env, run_id, idx)
        assert (row["status"], row["attempts"], row["restarts"]) == ("done", 1, 0)
        sched = json.loads(row["scheduler"])
        assert sched["state"] == "COMPLETED" and sched["nodes"] == "cn[1-2]", sched
        assert (run_dir / "stages" / stage / "slurm.1.sbatch").exists()
    started = [e for e in events(env, run_id, "@run", "status") if e["state"] == "stage_started"]
    assert len(started) == 2 and "sbatch --parsable" in started[0]["commands"]
    assert "--machine_rank '{SLURM_NODEID}'" in started[0]["commands"]
    with db(env) as con:
        nodes = {n for (n,) in con.execute("SELECT DISTINCT node FROM telemetry WHERE run_id = ?", [run_id])}
    assert nodes == {"cn1", "cn2"}, nodes  # srun --overlap on every allocated node
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(run_dir / "stages" / "s2" / "final")
    assert model.config.hidden_size == 32
    print(f"2-stage Slurm run: {ref_run.seconds:.0f} s")


def test_stop_then_resume_is_bit_exact(ref_run: Ref, slurm_cluster: SlurmCluster, cpt_home, tmp_path):
    c = slurm_cluster
    env = {**with_slurm(cpt_home, c), "CPT_FAULT_SLOW_S": "0.3"}
    preset = tiny_preset(tmp_path / "p.yaml", STAGES, every=8, cluster=slurm_cl(c), micro=4, name="tiny-slurm")
    run_id = start(env, preset, "--telemetry-interval", "0")
    wait_for(lambda: [e for e in events(env, run_id, "s1", "metric") if e["step"] >= 10], 300, "step 10 of s1")
    job = job_of(env, run_id)
    assert c.squeue(job).startswith("RUNNING")
    r = run_cli(["stop", run_id], env, timeout=180)
    assert r.returncode == 0 and "stopped" in r.stdout, r.stdout + r.stderr
    row = wait_done(env, run_id, 120)
    assert row["status"] == "stopped", row
    stopped = [e for e in events(env, run_id, "s1", "status") if e["state"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["reason"] == "SIGTERM"  # the trainer checkpointed and exited 75
    run_dir = Path(row["run_dir"])
    assert (run_dir / "stages" / "s1" / "checkpoints" / f"step-{stopped[0]['step']}" / "trainer_state.json").exists()
    assert c.squeue(job) == "" and c.state(job) not in ("RUNNING", "PENDING")  # the job is gone from squeue

    r = run_cli(["resume", run_id], env, timeout=120)
    assert r.returncode == 0, r.stderr
    row = wait_done(env, run_id, 240)
    assert row["status"] == "done", row["error"]
    assert_rows_equal_events(env, run_id, ["s1", "s2"])
    got = losses(run_dir, "s1")
    assert got == ref_run.losses  # fp32, bit-exact against the uninterrupted run
    evs, _ = read_events(run_dir / "stages" / "s1" / "events.jsonl")
    assert [e["step"] for e in evs if e["type"] == "metric"] == list(range(1, STAGES[0][1] + 1))


def test_scancel_kill_restarts_from_checkpoint(slurm_cluster: SlurmCluster, cpt_home, tmp_path):
    c = slurm_cluster
    env = {**with_slurm(cpt_home, c), "CPT_FAULT_SLOW_S": "0.3"}
    preset = tiny_preset(tmp_path / "p.yaml", [("s1", 60)], every=5, cluster=slurm_cl(c), micro=4, name="tiny-slurm")
    run_id = start(env, preset, "--telemetry-interval", "0", "--restart-backoff", "0.5")
    run_dir = Path(run_row(env, run_id)["run_dir"])
    wait_for(lambda: events(env, run_id, "s1", "checkpoint"), 300, "a checkpoint")
    job = job_of(env, run_id)
    r = c.run(["scancel", "-s", "KILL", job])
    assert r.returncode == 0, r.stderr

    def restarted():
        return [e for e in events(env, run_id, "@run", "status") if e["state"] == "restarting"]
    (restart,) = wait_for(restarted, 120, "the restart after scancel -s KILL")
    assert restart["restart"] == 1 and restart["resume_from"]
    row = wait_done(env, run_id, 300)
    assert row["status"] == "done", row["error"]
    s1 = stage_row(env, run_id)
    restarts = [e["reason"] for e in events(env, run_id, "@run", "status") if e["state"] == "restarting"]
    assert (s1["restarts"], s1["attempts"]) == (1, 2), (  # a crash: the restart policy
        restarts, (run_dir / "stages" / "s1" / "train.log").read_text()[-6000:] + c.log_tails())
    started = [e for e in events(env, run_id, "@run", "status") if e["state"] == "stage_started"]
    assert [e["attempt"] for e in started] == [1, 2]
    assert "slurm.2.sbatch" in started[1]["commands"] and "slurm.1.sbatch" not in started[1]["commands"]
    evs, _ = read_events(run_dir / "stages" / "s1" / "events.jsonl")
    i = next(k for k, e in enumerate(evs) if e["type"] == "status" and e.get("resumed_from"))
    last_ck = [e for e in evs[:i] if e["type"] == "checkpoint"][-1]
    assert evs[i]["resumed_from"] == last_ck["path"] and restart["resume_from"] == Path(last_ck["path"]).name
    assert next(e for e in evs[i:] if e["type"] == "metric")["step"] == last_ck["step"] + 1
    assert sorted(losses(run_dir, "s1")) == list(range(1, 61))
    assert_rows_equal_events(env, run_id, ["s1"])


def test_time_limit_requeues_without_counting_a_crash(slurm_cluster: SlurmCluster, cpt_home, tmp_path):
    """The job's limit is cut to 2 min once it has checkpointed (`scontrol update`): Slurm TERMs the batch
    shell `signal_grace` s before it (up to ~30 s late), the trainer checkpoints, the stage is resubmitted
    and completes, and no restart is counted."""
    c = slurm_cluster
    env = {**with_slurm(cpt_home, c), "CPT_FAULT_SLOW_S": "0.3"}
    preset = tiny_preset(tmp_path / "p.yaml", [("s1", 160)], every=10, cluster=slurm_cl(c, signal_grace=60),
                         micro=4, name="tiny-slurm")
    run_id = start(env, preset, "--telemetry-interval", "0", "--max-restarts", "0")
    run_dir = Path(run_row(env, run_id)["run_dir"])
    wait_for(lambda: events(env, run_id, "s1", "checkpoint"), 300, "a checkpoint")
    job = job_of(env, run_id)
    c.run(["scontrol", "update", f"JobId={job}", "TimeLimit=2"], check=True)

    def requeued():
        return [e for e in events(env, run_id, "@run", "status") if e["state"] == "requeued"]
    (rq,) = wait_for(requeued, 150, "the requeue before the time limit")
    assert f"Slurm job {job}" in rq["reason"] and rq["resume_from"]
    row = wait_done(env, run_id, 300)
    assert row["status"] == "done", row["error"]
    s1 = stage_row(env, run_id)
    assert (s1["restarts"], s1["attempts"]) == (0, 2)  # resubmitted, not a crash
    stopped = [e for e in events(env, run_id, "s1", "status") if e["state"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["reason"] == "SIGTERM"  # checkpointed on Slurm's signal
    evs, _ = read_events(run_dir / "stages" / "s1" / "events.jsonl")
    i = next(k for k, e in enumerate(evs) if e["type"] == "status" and e.get("resumed_from"))
    assert next(e for e in evs[i:] if e["type"] == "metric")["step"] == stopped[0]["step"] + 1
    assert sorted(losses(run_dir, "s1")) == list(range(1, 161))
    assert_rows_equal_events(env, run_id, ["s1"])


def test_kill9_supervisor_job_survives_and_is_adopted(slurm_cluster: SlurmCluster, cpt_home, tmp_path):
    c = slurm_cluster
    env = {**with_slurm(cpt_home, c), "CPT_FAULT_SLOW_S": "0.2"}
    preset = tiny_preset(tmp_path / "p.yaml", [("s1", 60)], every=10, cluster=slurm_cl(c), micro=4,
                         name="tiny-slurm")
    run_id = start(env, preset, "--telemetry-interval", "0")
    wait_for(lambda: events(env, run_id, "s1", "metric"), 300, "a first metric")
    row = run_row(env, run_id)
    sup, job = row["pid"], job_of(env, run_id)
    cpu = _cpu_of(sup, 8.0)
    os.kill(sup, signal.SIGKILL)
    wait_for(lambda: not proc_alive(sup), 10, "the supervisor to die")
    ev_file = Path(row["run_dir"]) / "stages" / "s1" / "events.jsonl"
    n0 = len(read_events(ev_file)[0])
    wait_for(lambda: len(read_events(ev_file)[0]) >= n0 + 5, 60, "the job to go on without its supervisor")
    assert c.squeue(job).startswith("RUNNING")
    r = run_cli(["resume", run_id], env, timeout=120)
    assert r.returncode == 0 and "resumed" in r.stdout, r.stdout + r.stderr
    row = wait_done(env, run_id, 200)
    assert row["status"] == "done", row["error"]
    assert_rows_equal_events(env, run_id, ["s1"])
    s1 = stage_row(env, run_id)
    assert (s1["attempts"], s1["restarts"]) == (1, 0)  # adopted by job id, not resubmitted
    states = [e["state"] for e in events(env, run_id, "@run", "status")]
    assert "adopted" in states and states[-1] == "done"
    print(f"supervisor CPU following a Slurm job: {cpu * 100:.2f} % of a core")
    assert cpu < 0.05  # the bench (bench/slurm.py) measures < 2 % without the trainer's ingest


def _cpu_of(pid: int, seconds: float) -> float:
    """CPU of a process and its reaped children (squeue, scontrol) per second of wall time."""
    def ticks():
        st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(x) for x in st[11:15])
    t0, c0 = time.monotonic(), ticks()
    time.sleep(seconds)
    return (ticks() - c0) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - t0)


def test_pending_job_shows_reason_and_invalid_partition_is_exit_2(slurm_cluster: SlurmCluster, cpt_home, tmp_path):
    c = slurm_cluster
    env = with_slurm(cpt_home, c)
    bad = tiny_preset(tmp_path / "bad.yaml", [("s1", 10)], cluster=slurm_cl(c, partition="nope"), micro=4)
    r = run_cli(["--run", str(bad), "--detach"], env, timeout=60)
    assert r.returncode == 2 and "partition 'nope' does not exist" in r.stderr and "debug" in r.stderr, r.stderr
    assert not Path(cpt_home["CPT_TUI_HOME"], "runs").exists()

    preset = tiny_preset(tmp_path / "p.yaml", [("s1", 10)], cluster=slurm_cl(c, nodes=4), micro=2,
                         name="tiny-slurm")  # more nodes than the partition has: pending forever
    run_id = start(env, preset, "--telemetry-interval", "0")
    sched = wait_for(lambda: (lambda s: s if s and s["state"] == "PENDING" and s["reason"] != "None" else None)(
        json.loads(stage_row(env, run_id)["scheduler"] or "null")), 120, "the job to pend with a reason")
    assert sched["reason"] == "PartitionConfig"
    from cpt_tui.store import Store
    from cpt_tui.ui.data import RUN_COLUMNS, run_rows
    with Store(env["CPT_TUI_DB"], readonly=True) as s:
        (row,) = [x for x in run_rows(s) if x.cells[0] == run_id]
    cell = dict(zip(RUN_COLUMNS, row.cells))["nodes"]
    assert cell == f"slurm ×4: job {sched['job']} PENDING (PartitionConfig)", cell
    r = run_cli(["stop", run_id], env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert wait_done(env, run_id, 60)["status"] == "stopped"
    assert c.squeue(sched["job"]) == ""


def test_a_job_its_nodes_cannot_launch_fails_naming_the_shared_filesystem(slurm_cluster: SlurmCluster, cpt_home,
                                                                         tmp_path):
    """Nodes that do not see the run directory: slurmd cannot open the job's output file and Slurm fails
    the job before anything runs (Reason=JobLaunchFailure, ExitCode=0:53, measured on this cluster). Here
    the job is submitted held (`--hold`), its stage directory removed, then released: no node has the
    output file's directory. The stage's failure says what to check, not only `exit 181`."""
    import shutil
    c = slurm_cluster
    env = with_slurm(cpt_home, c)
    preset = tiny_preset(tmp_path / "p.yaml", [("s1", 10)], cluster=slurm_cl(c, extra=["--hold"]), micro=4,
                         name="tiny-slurm")
    run_id = start(env, preset, "--telemetry-interval", "0", "--max-restarts", "0")
    job = wait_for(lambda: job_of(env, run_id), 120, "the job to be submitted")
    assert c.state(job) == "PENDING"
    stage_dir = Path(run_row(env, run_id)["run_dir"]) / "stages" / "s1"
    shutil.rmtree(stage_dir)
    c.run(["scontrol", "release", job], check=True)
    row = wait_done(env, run_id, 180)
    assert row["status"] == "failed", row
    err = row["error"]
    assert f"exit 181: Slurm could not launch job {job} on cn[1-2] (FAILED, Reason=JobLaunchFailure" in err, err
    assert "ExitCode=0:53" in err and "the nodes must see the run directory at the same path" in err, err
    assert str(stage_dir / "train.log") in err
