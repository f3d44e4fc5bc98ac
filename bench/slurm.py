"""Benchmark: the supervisor's CPU while it follows a Slurm job (the Slurm backend's polling).

    SLURM_CONF=/path/slurm.conf python bench/slurm.py [--seconds 30] [--partition P]
    python bench/slurm.py --fixture          # root: start the 2-node test cluster (tests/slurm_cluster.py)

Submits a 2-node `sleep` job through the backend's client commands, then runs the supervisor's follow
loop against it (poll every 0.5 s, which the backend turns into at most one squeue per second, plus
the scheduler state for the runs list) and measures the CPU of this process and of the Slurm client
commands it ran (getrusage SELF + CHILDREN) per second of wall time. Budget: < 2 % of one core.
(The end-to-end figure with ingest is printed by tests/test_slurm_backend.py's kill -9 test.)

Prints `ratio cpu/budget = X` (< 1 meets the budget).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUDGET = 0.02


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def follow(env: dict, partition: str | None, seconds: float, nodes: int) -> float:
    from cpt_tui.backends.slurm import SlurmBackend
    from cpt_tui.procs import Proc
    from engine.spec import ClusterSpec

    b = SlurmBackend(ClusterSpec(kind="slurm", slurm={"nodes": nodes, "partition": partition}), local_env=env)
    b.preflight()
    argv = ["sbatch", "--parsable", f"--nodes={nodes}", "--ntasks-per-node=1", "--output=/dev/null",
            *([f"--partition={partition}"] if partition else []), "--wrap", f"srun sleep {seconds + 60:.0f}"]
    job = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout.strip()
    p = Proc("slurm", int(job), -1, time.time(), None, True, "slurm")
    try:
        deadline = time.monotonic() + 60
        while b.job(job, fresh=True).state != "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.5)
        t0, c0 = time.monotonic(), _cpu()
        while time.monotonic() - t0 < seconds:
            assert b.poll([p]) == [None]
            b.scheduler_state([p])
            time.sleep(0.5)  # cpt_tui.supervisor.POLL_S
        return (_cpu() - c0) / (time.monotonic() - t0)
    finally:
        subprocess.run(["scancel", job], env=env)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--partition", default=None)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--fixture", action="store_true", help="start the 2-node test cluster (root)")
    a = ap.parse_args()
    if a.fixture:
        from tests import slurm_cluster as sc
        d = Path(tempfile.mkdtemp(prefix="cpt-slurm-bench-"))
        procs: dict = {}
        cluster = None
        try:
            cluster = sc._start_cluster(d, procs)
            cpu = follow(cluster.env, cluster.partition, a.seconds, a.nodes)
        finally:
            sc._teardown(d, cluster, procs)
    else:
        if not os.environ.get("SLURM_CONF") and not Path("/etc/slurm/slurm.conf").exists():
            print("set SLURM_CONF (or use --fixture as root)", file=sys.stderr)
            return 2
        cpu = follow(dict(os.environ), a.partition, a.seconds, a.nodes)
    print(f"supervisor CPU following a Slurm job (poll 1 Hz): {cpu * 100:.2f} % of a core")
    print(f"ratio cpu/budget = {cpu / BUDGET:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
