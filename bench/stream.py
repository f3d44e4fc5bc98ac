"""Benchmark: the event stream of ssh `shared_fs: false` (cpt_tui/backends/stream.py).

    python bench/stream.py [--rows 200000] [--cpu-seconds 30]      (needs sshd: run as root, as the tests)

Starts a throwaway sshd on loopback (tests/hosts.py's helpers) as "the node"; its workdir is a
directory the manager side never reads directly: events come back only over the ssh channel.

1. Ingest rate: N metric events written by the engine's EventWriter into the node's
   runs/RUN/stages/s1/events.jsonl, then ingested the way the supervisor does it (read_lines from
   the stored byte offset, Store.ingest with the offset, 1 MiB polls, POLL_S sleeps when nothing is
   new) (a) from a local file, (b) from the manager's copy while the backend's EventStream fills it
   over ssh (started at the same moment: the stream and the ingest overlap, as in a run).
   Prints `ratio remote/local events/s = X` (target >= 0.5).
2. CPU while streaming at 1 Hz: a stand-in trainer appends one metric event a second on the node;
   the supervisor's loop (deliver the stream's notes, read + ingest every POLL_S) follows it through
   the stream for --cpu-seconds. Measured: this process's CPU (main loop + the stream's reader thread)
   plus the ssh client's (psutil), per wall second; the node side (sshd, the reader under its guard)
   is the node's, not counted. Prints `ratio cpu/budget = Y` (budget: 2 % of one core; < 1 meets it).
"""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from cpt_tui.backends.ssh import SshBackend  # noqa: E402
from cpt_tui.collector import read_lines  # noqa: E402
from cpt_tui.store import Store  # noqa: E402
from cpt_tui.supervisor import POLL_S  # noqa: E402
from engine.events import EventWriter  # noqa: E402
from engine.layout import StageLayout  # noqa: E402
from engine.spec import ClusterSpec  # noqa: E402
from tests.hosts import (SSHD, _client_block, _client_defaults, _keys, _port_open, _sshd_config,  # noqa: E402
                         free_port)

BUDGET = 0.02
CHUNK = 1 << 20
RUN = "bench-run"
WRITER = r"""
import sys, time
from engine.events import EventWriter
w = EventWriter(sys.argv[1], "s1")
i = 0
while True:
    i += 1
    w.emit("metric", step=i, tokens=i * 4096, loss=3.0, lr=3e-4, grad_norm=0.8, tokens_per_s=1.0, total_steps=10**6)
    time.sleep(1.0)
"""


def start_sshd(d: Path):
    host_key, key = _keys(d)
    port = free_port()
    cfg = d / "sshd_config"
    _sshd_config(cfg, d, host_key, "127.0.0.1", port, d / "sshd.pid")
    proc = subprocess.Popen([SSHD, "-D", "-f", str(cfg), "-E", str(d / "sshd.log")], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not _port_open("127.0.0.1", port):
        time.sleep(0.05)
    if not _port_open("127.0.0.1", port):
        proc.kill()
        sys.exit(f"sshd did not start: {(d / 'sshd.log').read_text()[-2000:]}")
    ssh_config = d / "ssh_config"
    user = getpass.getuser()
    ssh_config.write_text(_client_block(["node-a"], "127.0.0.1", port, user) + _client_defaults(key, user))
    return proc, ssh_config


def backend(ssh_config: Path, workdir: Path) -> SshBackend:
    cluster = ClusterSpec(kind="ssh", shared_fs=False, processes_per_node=1, ssh_options=["-F", str(ssh_config)],
                          nodes=[{"host": "node-a", "workdir": str(workdir), "python": sys.executable,
                                  "env": {"PYTHONPATH": str(ROOT)}}])
    return SshBackend(cluster)


def new_store(tmp: Path, name: str) -> Store:
    store = Store(tmp / f"{name}.db")
    store.create_run(name, name, "-", str(tmp), {"stages": [{"index": 0, "name": "s1", "kind": "cpt", "steps": 1,
                                                                  "tokens": 1}]}, "host")
    return store


def ingest_until(store: Store, run_id: str, path: Path, rows: int) -> float:
    """The supervisor's loop until `rows` events are stored; returns the seconds it took."""
    t0, offset, n = time.perf_counter(), 0, 0
    while n < rows:
        recs, raw, new = read_lines(path, offset, CHUNK) if path.exists() else ([], b"", offset)
        if new == offset:
            time.sleep(POLL_S)  # nothing new: the supervisor waits a poll
            continue
        n += store.ingest(run_id, recs, raw=raw, stage_idx=0, offset=new)
        offset = new
    return time.perf_counter() - t0


def bench_rate(rows: int, tmp: Path, ssh_config: Path, workdir: Path) -> tuple[float, float]:
    node_file = workdir / "runs" / RUN / "stages" / "s1" / "events.jsonl"
    node_file.parent.mkdir(parents=True)
    w = EventWriter(node_file, "s1")
    for i in range(1, rows + 1):
        w.emit("metric", step=i, tokens=i * 4096, loss=3.0 - i * 1e-6, lr=3e-4, grad_norm=0.8, tokens_per_s=123456.7,
               total_steps=rows)
    w.close()
    local = tmp / "local" / "events.jsonl"
    local.parent.mkdir()
    shutil.copyfile(node_file, local)
    store = new_store(tmp, "local")
    t_local = ingest_until(store, "local", local, rows)
    store.close()

    mgr = StageLayout(tmp / "manager" / "runs" / RUN / "stages" / "s1")
    mgr.root.mkdir(parents=True)
    b = backend(ssh_config, workdir)
    store = new_store(tmp, "remote")
    t0 = time.perf_counter()
    b._start_stream(mgr)
    t_remote = ingest_until(store, "remote", mgr.events, rows)
    t_remote = max(t_remote, time.perf_counter() - t0)
    b._finish_stream()
    assert store.db.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == rows
    store.close()
    assert mgr.events.read_bytes() == node_file.read_bytes()
    mb = node_file.stat().st_size / 2**20
    print(f"ingest of {rows:,} metric events ({mb:.1f} MiB): local file {rows / t_local:,.0f} events/s "
          f"({t_local:.2f} s); streamed over ssh {rows / t_remote:,.0f} events/s ({t_remote:.2f} s)")
    return rows / t_local, rows / t_remote


def bench_cpu(seconds: float, tmp: Path, ssh_config: Path, workdir: Path) -> float:
    run = "cpu-run"
    node_file = workdir / "runs" / run / "stages" / "s1" / "events.jsonl"
    node_file.parent.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(node_file)], env=env)  # the "trainer"
    mgr = StageLayout(tmp / "manager" / "runs" / run / "stages" / "s1")
    mgr.root.mkdir(parents=True)
    b = backend(ssh_config, workdir)
    store = new_store(tmp, "cpu")
    try:
        b._start_stream(mgr)
        deadline = time.monotonic() + 30
        while b._stream.proc is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2)  # connected
        ssh = psutil.Process(b._stream.proc.pid)
        s0, c0, t0 = sum(ssh.cpu_times()[:2]), time.process_time(), time.monotonic()
        offset = n = 0
        while time.monotonic() - t0 < seconds:  # the supervisor's follow loop
            b._deliver()
            recs, raw, new = read_lines(mgr.events, offset, CHUNK) if mgr.events.exists() else ([], b"", offset)
            if recs or new != offset:
                n += store.ingest("cpu", recs, raw=raw, stage_idx=0, offset=new)
                offset = new
            time.sleep(POLL_S)
        wall = time.monotonic() - t0
        cpu = time.process_time() - c0 + sum(ssh.cpu_times()[:2]) - s0
    finally:
        writer.kill()
        writer.wait()
        b._finish_stream()
        store.close()
    print(f"streaming at 1 Hz for {wall:.0f} s: {n} events ingested; supervisor side (this process + its ssh client) "
          f"{cpu:.3f} CPU-s = {100 * cpu / wall:.2f} % of a core (budget {100 * BUDGET:g} %)")
    return cpu / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--cpu-seconds", type=float, default=30.0)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cpt-bench-stream-"))
    sshd = None
    try:
        sshd, ssh_config = start_sshd(tmp)
        workdir = tmp / "node-workdir"
        workdir.mkdir()
        local, remote = bench_rate(a.rows, tmp, ssh_config, workdir)
        cpu = bench_cpu(a.cpu_seconds, tmp, ssh_config, workdir)
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"ratio remote/local events/s = {remote / local:.2f}")
        print(f"ratio cpu/budget = {cpu / BUDGET:.3f}")
    finally:
        if sshd is not None:
            sshd.terminate()
            sshd.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
