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


def slurm_cl(c: SlurmCluster, nodes: int = 2, env: dict | None = None, **slurm) -> dict:
    return {"kind": "slurm", "processes_per_node": 1, "main_process_port": free_port(),
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
    cluster = ClusterSpec(**slurm_cl(c, env={"EVIL": evil, "SPACED": "two  words"}))
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
    assert "main 127.0.0.1" in log  # the first node's NodeAddr, not its (unresolvable) name
    assert not pwned.exists()
    assert sl.job_exit(1).read_text().strip() == "0"
