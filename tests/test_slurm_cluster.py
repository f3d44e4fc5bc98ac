"""The Slurm test cluster (tests/slurm_cluster.py) works: two idle nodes, real 2-node job steps, a real 2-rank
torch.distributed (gloo) world across the two slurmds, scancel / signals / hold / pending reasons as the
Slurm launch backend will use them. Findings and timings: tests/SLURM-NOTES.md.

Needs root and slurm-wlm + munge (.ci/setup-slurm.sh); skips otherwise, fails instead under CI.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from tests.hosts import free_port
from tests.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def _empty_queue(slurm_cluster: SlurmCluster):
    """Each test starts and ends with an empty queue (a failed test must not leave jobs for the next)."""
    assert slurm_cluster.cancel_all(), slurm_cluster.run(["squeue"]).stdout
    yield
    assert slurm_cluster.cancel_all(), slurm_cluster.run(["squeue"]).stdout


def _wait_files(paths, timeout: float, cluster: SlurmCluster, job: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(p.exists() and p.read_text().strip() for p in paths):
            return
        time.sleep(0.1)
    raise AssertionError(f"{[str(p) for p in paths]} not written within {timeout}s; job {cluster.job(job)}\n"
                         f"output:\n{cluster.output(job)}\n{cluster.log_tails()}")


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(("srun:", "slurmstepd"))]


def test_both_nodes_idle(slurm_cluster: SlurmCluster):
    c = slurm_cluster
    r = c.run(["sinfo", "-h", "-N", "-p", c.partition, "-o", "%N %t %P"], check=True)
    assert sorted(r.stdout.split("\n")[:-1]) == [f"{n} idle {c.partition}*" for n in c.nodes], r.stdout
    assert c.version.startswith("slurm"), c.version
    # Node names are Slurm's own; both map to this host at 127.0.0.1.
    r = c.run(["scontrol", "show", "hostnames", ",".join(c.nodes)], check=True)
    assert r.stdout.split() == c.nodes
    for n in c.nodes:
        rec = c.run(["scontrol", "show", "node", "-o", n], check=True).stdout
        assert "NodeAddr=127.0.0.1" in rec and f"NodeHostName={c.hostname}" in rec, rec


def test_two_node_batch_job(slurm_cluster: SlurmCluster):
    c = slurm_cluster
    job = c.sbatch("srun hostname\nsrun printenv SLURM_NODEID\nsrun printenv SLURMD_NODENAME\n",
                   "--nodes=2", "--ntasks-per-node=1", "--time=0:01:00")
    assert c.wait(job, timeout=60) == "COMPLETED", c.output(job)
    out = _lines(c.output(job))
    assert sorted(out) == sorted([c.hostname, c.hostname, "0", "1", *c.nodes]), out
    rec = c.job(job)
    assert rec["ExitCode"] == "0:0" and rec["NodeList"] == "cn[1-2]" and rec["TimeLimit"] == "00:01:00", rec
    # A finished job: gone from plain `squeue -j`, still known to `squeue -t all` and scontrol (MinJobAge).
    assert c.squeue(job) == ""
    assert c.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%T"]).stdout.strip() == "COMPLETED"


_GLOO = r"""
import datetime, os, socket
import torch, torch.distributed as dist
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
t = torch.ones(1)
dist.all_reduce(t)
print(f"rank={rank} world={dist.get_world_size()} node={os.environ['SLURMD_NODENAME']} "
      f"nodeid={os.environ['SLURM_NODEID']} sum={t.item():g}", flush=True)
dist.destroy_process_group()
"""


def test_torch_gloo_world_of_two_across_the_slurmds(slurm_cluster: SlurmCluster):
    """The key proof: one rank per slurmd, a real 2-rank gloo world, all_reduce(ones) == 2."""
    c = slurm_cluster
    (c.dir / "gloo_probe.py").write_text(_GLOO)
    port = free_port()
    script = f"""\
set -eu
first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)
# The node name (cn1) does not resolve here; the node's NodeAddr is what Slurm itself uses to reach it.
export MASTER_ADDR=$(scontrol show node "$first" -o | tr ' ' '\\n' | sed -n 's/^NodeAddr=//p')
export MASTER_PORT={port}
echo "first=$first MASTER_ADDR=$MASTER_ADDR"
srun --kill-on-bad-exit=1 bash -c 'RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS exec python {c.dir}/gloo_probe.py'
"""
    job = c.sbatch(script, "--nodes=2", "--ntasks-per-node=1", "--export=ALL", "--time=0:02:00")
    state = c.wait(job, timeout=120)
    out = c.output(job)
    assert state == "COMPLETED", f"{state}\n{out}\n{c.log_tails()}"
    assert "first=cn1 MASTER_ADDR=127.0.0.1" in out, out
    got = sorted(ln for ln in out.splitlines() if ln.startswith("rank="))
    assert got == ["rank=0 world=2 node=cn1 nodeid=0 sum=2", "rank=1 world=2 node=cn2 nodeid=1 sum=2"], out


def test_job_uses_the_venv_python(slurm_cluster: SlurmCluster):
    c = slurm_cluster
    job = c.sbatch("srun -N1 python -c 'import sys; print(sys.executable)'", "--nodes=1", "--export=ALL")
    assert c.wait(job, timeout=60) == "COMPLETED", c.output(job)
    assert _lines(c.output(job)) == [sys.executable], c.output(job)


@pytest.mark.skipif(not os.environ.get("CPT_SLURM_SLOW"),
                    reason="a --time=0:01:00 job is only killed after 60-90 s here (slurmctld checks time limits "
                           "every ~30 s); set CPT_SLURM_SLOW=1 to run it")
def test_time_limit_enforced(slurm_cluster: SlurmCluster):
    c = slurm_cluster
    job = c.sbatch("sleep 300", "--nodes=1", "--time=0:01:00")
    assert c.wait(job, timeout=150) == "TIMEOUT"
    assert c.job(job)["Reason"] == "TimeLimit"


def test_scancel_running_job(slurm_cluster: SlurmCluster):
    c = slurm_cluster
    pids = [c.dir / f"scancel-{i}.pid" for i in range(2)]
    for p in pids:
        p.unlink(missing_ok=True)
    job = c.sbatch(f"srun bash -c 'echo $$ > {c.dir}/scancel-$SLURM_PROCID.pid; exec sleep 300'",
                   "--nodes=2", "--ntasks-per-node=1")
    c.wait(job, timeout=30, states=("RUNNING",))
    _wait_files(pids, 30, c, job)
    assert c.squeue(job) == "RUNNING None"
    t0 = time.monotonic()
    c.run(["scancel", job], check=True)
    deadline = t0 + 15
    while c.run(["squeue", "-h", "-o", "%i"]).stdout.strip() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert c.run(["squeue", "-h", "-o", "%i"]).stdout.strip() == "", c.run(["squeue"]).stdout
    assert time.monotonic() - t0 < 15
    assert c.state(job) == "CANCELLED"
    for p in pids:  # the step's processes are gone too
        pid = int(p.read_text())
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{pid}"), f"step process {pid} survived scancel"


def test_signal_term_reaches_the_steps(slurm_cluster: SlurmCluster):
    """`scancel --signal=TERM J` signals the job's steps (not the batch shell): a trap in each task sees it."""
    c = slurm_cluster
    marks = [c.dir / f"sig-{i}.ready" for i in range(2)]
    for p in marks:
        p.unlink(missing_ok=True)
    (c.dir / "sig-step.sh").write_text(
        "trap 'echo step $SLURM_PROCID got TERM; exit 0' TERM\n"
        f"echo 1 > {c.dir}/sig-$SLURM_PROCID.ready\n"
        "sleep 120 & wait\n")
    job = c.sbatch(f"trap 'echo batch got TERM' TERM\nsrun bash {c.dir}/sig-step.sh\necho srun rc=$?\n",
                   "--nodes=2", "--ntasks-per-node=1")
    c.wait(job, timeout=30, states=("RUNNING",))
    _wait_files(marks, 30, c, job)
    c.run(["scancel", "--signal=TERM", job], check=True)
    assert c.wait(job, timeout=30) == "COMPLETED"
    out = c.output(job)
    assert "step 0 got TERM" in out and "step 1 got TERM" in out and "srun rc=0" in out, out
    assert "batch got TERM" not in out, out


def test_srun_overlap_into_a_running_job(slurm_cluster: SlurmCluster):
    """Telemetry on allocated nodes: `srun --overlap --jobid J` runs next to a step holding all the CPUs."""
    c = slurm_cluster
    job = c.sbatch("srun sleep 120", "--nodes=2", "--ntasks-per-node=1")
    try:
        c.wait(job, timeout=30, states=("RUNNING",))
        deadline = time.monotonic() + 30
        while ".0 " not in c.run(["squeue", "-h", "-s", "-j", job, "-o", "%i "]).stdout + " ":
            assert time.monotonic() < deadline, c.job(job)
            time.sleep(0.1)
        t0 = time.monotonic()
        r = c.run(["srun", "--overlap", "--jobid", job, "-N2", "--ntasks-per-node=1", "bash", "-c",
                   "echo $SLURMD_NODENAME $SLURM_STEP_ID"], timeout=30)
        assert r.returncode == 0, r.stderr
        assert sorted(ln.split()[0] for ln in r.stdout.splitlines()) == c.nodes, r.stdout
        assert time.monotonic() - t0 < 10
        # Without --overlap the step waits for the CPUs the running step holds.
        r = c.run(["srun", "--jobid", job, "-N1", "--immediate=3", "true"], timeout=30)
        assert r.returncode != 0, (r.stdout, r.stderr)
    finally:
        c.run(["scancel", job])
        c.wait(job, timeout=30)


def test_hold_and_release(slurm_cluster: SlurmCluster):
    c = slurm_cluster
    job = c.sbatch("true", "--nodes=1", "--hold")
    assert c.squeue(job) == "PENDING JobHeldUser"
    time.sleep(1)
    assert c.squeue(job) == "PENDING JobHeldUser"
    c.run(["scontrol", "release", job], check=True)
    assert c.wait(job, timeout=30) == "COMPLETED"


def test_three_nodes_stay_pending_with_a_reason(slurm_cluster: SlurmCluster):
    c = slurm_cluster
    job = c.sbatch("true", "--nodes=3")
    try:
        deadline = time.monotonic() + 10
        while c.squeue(job) in ("PENDING None", "") and time.monotonic() < deadline:
            time.sleep(0.2)  # the reason is set once the scheduler has looked at the job
        time.sleep(1)
        state, reason = c.squeue(job).split()
        assert state == "PENDING" and reason == "PartitionConfig", (state, reason)
        assert c.job(job)["Reason"] == "PartitionConfig"
    finally:
        c.run(["scancel", job], check=True)
    assert c.wait(job, timeout=15) == "CANCELLED"


def test_sacct_needs_a_database(slurm_cluster: SlurmCluster):
    """No slurmdbd: sacct reports accounting disabled; job history is scontrol/squeue for MinJobAge only."""
    r = slurm_cluster.run(["sacct", "-n", "-X", "-o", "JobID,State"], timeout=30)
    assert "accounting storage is disabled" in (r.stdout + r.stderr).lower(), (r.returncode, r.stdout, r.stderr)
