"""Benchmark: SQLite ingest rate of metric events, and the CPU the supervisor + telemetry use.

    python bench/store.py [--rows 200000] [--cpu-seconds 30] [--skip-cpu]

1. Ingest: N metric events written by the engine's EventWriter to an events.jsonl, then read back and
   ingested the way the supervisor does it (read_events from a byte offset, Store.ingest with the
   offset, in chunks). Target: >= 50 000 metric events/s (each is one `events` row + one `metrics` row).
2. CPU: a real run of a tiny preset through `cpt-tui --run --detach` with telemetry at 1 Hz; while its
   trainer logs a metric every step, the CPU time of the supervisor process and of its telemetry
   sampler (guard + `python -m engine.telemetry`) is measured over a window. Target: < 2 % of one core.
   (The trainer itself is excluded: it is the work being supervised.)

Prints `ratio ingest/target = X` (higher is better, >= 1 meets the target) and `ratio cpu/budget = Y`
(lower is better, < 1 meets the budget).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from cpt_tui.store import Store  # noqa: E402
from cpt_tui.collector import read_lines  # noqa: E402
from engine.events import EventWriter, read_events  # noqa: E402

INGEST_TARGET = 50_000  # metric events / s
CPU_BUDGET = 0.02  # of one core


def bench_ingest(rows: int, tmp: Path) -> float:
    path = tmp / "events.jsonl"
    w = EventWriter(path, "s1")
    for i in range(1, rows + 1):
        w.emit("metric", step=i, tokens=i * 4096, loss=3.0 - i * 1e-6, lr=3e-4, grad_norm=0.8, tokens_per_s=123456.7,
               total_steps=rows)
    w.close()
    store = Store(tmp / "bench.db")
    plan = {"stages": [{"index": 0, "name": "s1", "kind": "cpt", "steps": rows, "tokens": rows * 4096}]}
    store.create_run("bench", "bench", "-", str(tmp), plan, "host")
    chunk = 1 << 20  # as if the trainer had written 1 MiB (≈ 5 000 records) since the previous poll
    t0, c0 = time.perf_counter(), time.process_time()
    offset, n = 0, 0
    while True:  # exactly what the supervisor's poll loop does
        recs, raw, new = read_lines(path, offset, chunk)
        if new == offset:
            break
        n += store.ingest("bench", recs, raw=raw, stage_idx=0, offset=new)
        offset = new
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    rate = rows / dt
    assert n == rows and store.db.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == rows
    t1 = time.perf_counter()
    assert store.ingest("bench", read_events(path, 0)[0]) == 0  # idempotent: a full re-read adds nothing
    again = rows / (time.perf_counter() - t1)
    print(f"ingest: {rows:,} metric events (read + parse + insert, {chunk >> 20} MiB polls) in {dt:.2f} s "
          f"= {rate:,.0f} events/s ({2 * rows:,} rows); idempotent re-read {again:,.0f} events/s")
    print(f"ingest per CPU-second of this process: {rows / cpu:,.0f} events/s (wall-clock rates drop when the "
          f"machine is shared: this process got {100 * cpu / dt:.0f} % of a core; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"ratio ingest/target = {rate / INGEST_TARGET:.2f}")
    print(f"ratio ingest_per_cpu_second/target = {rows / cpu / INGEST_TARGET:.2f}")
    store.close()
    return rate


PRESET = """
name: bench-cpu
seed: 1
model:
  config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, max_position_embeddings: 64}
tokenizer:
  train: {sources: [bprose], vocab_size: 300, max_chars: 200000}
sources:
  bprose: {path: "builtin:stdlib-prose", val_tokens: 1024, max_tokens: 400000}
stages:
  - name: s1
    mixture: {weights: {bprose: 1.0}, tokens: %d}
    seq_len: 32
    micro_batch_size: 8
    global_batch_size: 8
    precision: fp32
    schedule: {name: constant, lr: 1.0e-3}
    eval: {every_steps: 100000, max_blocks: 2}
    checkpoint: {every_steps: 100000, keep_last: 1}
    log_every: 1
"""


def _tree_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def bench_cpu(seconds: float, tmp: Path) -> float:
    home = tmp / "home"
    env = {**os.environ, "CPT_TUI_HOME": str(home), "CPT_TUI_DB": str(home / "db.sqlite"),
           "CPT_TUI_CACHE": str(tmp / "cache"), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    preset = tmp / "bench-cpu.yaml"
    preset.write_text(PRESET % (200_000 * 256))  # far more steps than the window: it is stopped after
    r = subprocess.run([sys.executable, "-m", "cpt_tui.cli", "--run", str(preset), "--detach",
                        "--telemetry-interval", "1"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise SystemExit(r.stderr)
    run_id = r.stdout.strip()
    con = sqlite3.connect(env["CPT_TUI_DB"], timeout=30)

    def metrics() -> int:
        return con.execute("SELECT COUNT(*) FROM metrics WHERE run_id = ?", [run_id]).fetchone()[0]

    deadline = time.monotonic() + 600
    while metrics() < 20 and time.monotonic() < deadline:  # preparation done, the trainer is logging
        time.sleep(1)
    sup = con.execute("SELECT pid FROM runs WHERE id = ?", [run_id]).fetchone()[0]
    procs = [sup]  # the supervisor, and its telemetry sampler (the guard and engine.telemetry under it)
    for c in psutil.Process(sup).children():
        try:
            if "engine.telemetry" in " ".join(c.cmdline()):
                procs += [c.pid] + [g.pid for g in c.children(recursive=True)]
        except psutil.Error:  # e.g. a zombie not yet reaped
            print(f"(child {c.pid}: {c.status()})")
    names = [" ".join(psutil.Process(p).cmdline()[1:3])[:40] for p in procs]
    m0, c0, w0 = metrics(), _tree_cpu(procs), time.monotonic()
    time.sleep(seconds)
    m1, c1, w1 = metrics(), _tree_cpu(procs), time.monotonic()
    subprocess.run([sys.executable, "-m", "cpt_tui.cli", "stop", run_id], env=env, cwd=ROOT, capture_output=True,
                   timeout=300)
    samples = con.execute("SELECT COUNT(*) FROM telemetry WHERE run_id = ?", [run_id]).fetchone()[0]
    frac = (c1 - c0) / (w1 - w0)
    print(f"cpu: supervisor + telemetry ({len(procs)} processes: {names}) used {c1 - c0:.2f} s CPU in "
          f"{w1 - w0:.1f} s = {100 * frac:.2f} % of one core, while ingesting {(m1 - m0) / (w1 - w0):.0f} "
          f"metric events/s and {samples} telemetry samples (1 Hz)")
    print(f"ratio cpu/budget = {frac / CPU_BUDGET:.2f}")
    return frac


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--cpu-seconds", type=float, default=30.0)
    ap.add_argument("--skip-cpu", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cpt-bench-") as d:
        bench_ingest(a.rows, Path(d))
        if not a.skip_cpu:
            bench_cpu(a.cpu_seconds, Path(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
