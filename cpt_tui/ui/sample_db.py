"""Deterministic sample databases: fixed data for UI snapshots and tests, a 1M-point run for the
benchmark, and a live-run simulator (a writer appending metric rows as a supervisor would).

    python -m cpt_tui.ui.sample_db build DB          # the fixed sample runs
    python -m cpt_tui.ui.sample_db live DB RUN_ID    # append metrics to RUN_ID until killed

Rows go through the Store as a supervisor writes them (`ingest` of engine-style event records), so
the schema and the encoding are the real ones; the big benchmark run inserts metric rows directly.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from cpt_tui.store import EvalRecord, MetricRecord, Store
from engine.layout import RunLayout

T0 = 1735689600.0  # 2025-01-01 00:00 UTC
DONE, LIVE, FAILED = "20250101-000000-tiny-demo-a1b2", "20250102-000000-tiny-demo-c3d4", "20250103-000000-ddp-e5f6"
SEQ_LEN, BATCH = 128, 16
TOK_PER_STEP = SEQ_LEN * BATCH


def _plan(stages):
    return {"preset": "tiny-demo", "world_size": 1, "cluster": "local",
            "stages": [{"index": i, "name": n, "kind": k, "steps": s, "tokens": s * TOK_PER_STEP}
                       for i, (n, k, s) in enumerate(stages)]}


def loss_at(global_step: float, stage_idx: int) -> float:
    """A smooth, deterministic loss curve with a bump at the start of stage 2 (new domain)."""
    base = 2.5 + 5.0 * math.exp(-global_step / 30.0)
    wiggle = 0.08 * math.sin(global_step * 0.7)
    return base + wiggle + (0.6 * math.exp(-(global_step - 96) / 10.0) if stage_idx else 0.0)


def _stage_records(stage, idx, steps, upto, ts0, offset, log_every=4, eval_every=24) -> list[dict]:
    """The stage's metric and eval events, as the engine writes them."""
    seq = 0
    recs = []
    for step in range(log_every, upto + 1, log_every):
        seq += 1
        g = offset + step
        ts = ts0 + step * 0.35
        lr = 3e-3 * min(1.0, step / 10) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        recs.append(dict(stage=stage, seq=seq, ts=ts, type="metric", step=step, tokens=step * TOK_PER_STEP,
                         loss=loss_at(g, idx), lr=lr, grad_norm=1.0, tokens_per_s=23000.0 + 500 * math.sin(step)))
        if step % eval_every == 0:
            for d, (a, b) in {"prose": (0.0, 0.0), "code": (0.4, 0.0012 * idx)}.items():
                seq += 1
                l = loss_at(g, 0) + a + (0.5 if d == "prose" and idx else 0) - b * step
                recs.append(dict(stage=stage, seq=seq, ts=ts, type="eval", step=step, tokens=step * TOK_PER_STEP,
                                 domain=d, loss=l))
    return recs


def _run(store: Store, run_id, preset, status, stages, progress, t0, run_dir_root: Path, error=None, host="sample"):
    layout = RunLayout(run_dir_root / run_id)
    (layout.root / "stages").mkdir(parents=True, exist_ok=True)
    store.create_run(run_id, preset, f"presets/{preset}.yaml", str(layout.root), _plan(stages), host)
    offset, cur = 0, 0
    for idx, (name, kind, steps) in enumerate(stages):
        upto = min(steps, max(0, progress - offset))
        st_status = "done" if upto == steps else ("pending" if upto == 0 else ("failed" if error else status))
        if upto:
            cur = idx
            store.ingest(run_id, _stage_records(name, idx, steps, upto, t0 + offset * 0.4, offset))
            st = layout.stage(name)
            st.root.mkdir(exist_ok=True)
            st.log.write_text(
                "".join(f"[{name}] step {s}/{steps} loss {loss_at(offset + s, idx):.4f}\n" for s in range(4, upto + 1, 4)))
        store.update_stage(run_id, idx, status=st_status, step=upto or None, tokens=upto * TOK_PER_STEP or None,
                           started=t0 + offset * 0.4 if upto else None,
                           finished=t0 + (offset + steps) * 0.4 if st_status == "done" else None)
        offset += steps
    store.update_run(run_id, status=status, started=t0, finished=t0 + 80 if status in ("done", "failed") else None,
                     current_stage=cur, error=error, heartbeat=t0 + 60)
    states = ["running", "stage_started"] + ([status] if status != "running" else [])
    store.ingest(run_id, [{"stage": "@run", "seq": i + 1, "ts": t0 + (80 if i == 2 else i), "type": "status",
                           "state": state, **({"reason": error} if error and i == 2 else {})}
                          for i, state in enumerate(states)])
    layout.preset.write_text(f"name: {preset}\ncluster: {{kind: local}}\n")


def _telemetry(store: Store, run_id: str, t0: float, n: int = 60) -> None:
    if not store.has_table("telemetry"):
        return
    samples = []
    for i in range(n):
        ts = t0 + i * 2
        samples.append({"ts": ts, "node": "local", "kind": "host", "index": None,
                        "metrics": {"cpu_percent": 50 + 40 * math.sin(i / 5), "ram_used": 4e9 + 1e7 * i}})
        samples.append({"ts": ts, "node": "local", "kind": "gpu", "index": 0,
                        "metrics": {"util_gpu": 80 + 15 * math.sin(i / 3), "mem_used": 3e10, "temperature": 60 + i % 7,
                                    "power_w": 250 + 30 * math.cos(i / 4)}})
    store.add_telemetry(run_id, samples)


# (task, metric, higher_is_better, base-model, base, cpt-code): the local task set's shape (engine/benchmarks)
BENCH = [("cpt_mc_prose", "acc", True, 0.25, 0.285, 0.27), ("cpt_mc_prose", "acc_norm", True, 0.25, 0.28, 0.28),
         ("cpt_ppl_code", "bits_per_byte", False, 11.02, 3.2155, 2.6572),
         ("cpt_ppl_prose", "bits_per_byte", False, 11.01, 2.954, 2.8475)]


def _benchmarks(store: Store, run_id: str, ts: float, stages=("base-model", "base", "cpt-code")) -> None:
    for col, stage in enumerate(stages):
        rows = [{"task": t, "metric": m, "higher_is_better": hib, "value": vals[col], "stderr": None if "bits" in m
                 else 0.03, "n_shot": 0, "limit": 40, "status": "ok", "ts": ts + col} for t, m, hib, *vals in BENCH]
        if stage == "cpt-code":
            rows.append({"task": "hellaswag", "status": "failed", "limit": 40, "ts": ts + col,
                         "reason": "ConnectionError: Couldn't reach 'Rowan/hellaswag' on the Hub (OfflineModeIsEnabled)"})
        store.record_benchmarks(run_id, stage, rows)


def build(db_path: str | Path, run_dir_root: str | Path | None = None) -> list[str]:
    """Three runs: done (2 stages), running (stage 2/2, half way), failed (stage 1). Same rows every time."""
    db_path = Path(db_path)
    root = Path(run_dir_root) if run_dir_root else db_path.parent / "runs"
    store = Store(db_path)
    try:
        _run(store, DONE, "tiny-demo", "done", [("base", "base", 96), ("cpt-code", "cpt", 96)], 192, T0, root)
        _run(store, LIVE, "tiny-demo", "running", [("base", "base", 96), ("cpt-code", "cpt", 96)], 144, T0 + 86400,
             root)
        _run(store, FAILED, "ddp-cluster", "failed", [("main", "cpt", 200)], 40, T0 + 2 * 86400, root,
             error="stage 'main' failed (exit 1): CUDA out of memory")
        _telemetry(store, DONE, T0)
        _benchmarks(store, DONE, T0)
        _benchmarks(store, LIVE, T0 + 86400, stages=("base-model", "base"))  # stage 2 still running
    finally:
        store.close()
    return [DONE, LIVE, FAILED]


def build_big(db_path: str | Path, n_points: int = 1_000_000, run_id: str = "big-run") -> str:
    """One run with `n_points` metric rows over two stages (for the open-time benchmark)."""
    db_path = Path(db_path)
    store = Store(db_path)
    half = n_points // 2
    try:
        store.create_run(run_id, "big", "", str(db_path.parent / "runs" / run_id),
                         {"stages": [{"index": i, "name": f"s{i}", "kind": "cpt", "steps": half, "tokens": half * 4096}
                                     for i in range(2)]}, "bench")
        for s in range(2):
            store.insert_metrics(
                (MetricRecord(run_id, f"s{s}", i, T0 + s * half + i, i, i * 4096,
                              2.5 + 3 * math.exp(-(s * half + i) / 2e5) + 0.05 * math.sin(i), 1e-4, 1.0, 5e4)
                 for i in range(1, half + 1)),
                (EvalRecord(run_id, f"s{s}", half + 2 * i + j, T0 + s * half + i, i, i * 4096, d, 3.0 - j / 2 - i / half)
                 for i in range(1000, half + 1, 1000) for j, d in enumerate(("en", "code"))))
            store.update_stage(run_id, s, status="done", step=half, tokens=half * 4096)
        store.update_run(run_id, status="done", started=T0, current_stage=1)
    finally:
        store.close()
    return run_id


def live(db_path: str | Path, run_id: str, interval: float = 0.5, steps: int = 1_000_000) -> None:
    """Append one metric row every `interval` s to the running stage of `run_id` (simulated trainer +
    supervisor), updating the stage's step/tokens as the supervisor does."""
    store = Store(db_path)
    stages = store.stages(run_id)
    idx = next(i for i, s in enumerate(stages) if s["status"] == "running")
    st = stages[idx]
    step = st["step"] or 0
    seq = max((e["seq"] for e in store.events_after(run_id) if e["stage"] == st["name"]), default=0)
    for _ in range(steps):
        step += 4
        seq += 1
        store.ingest(run_id, [dict(stage=st["name"], seq=seq, ts=time.time(), type="metric", step=step,
                                   tokens=step * TOK_PER_STEP, loss=loss_at(96 + step, idx), lr=1e-3, grad_norm=1.0,
                                   tokens_per_s=23000.0)])
        store.update_stage(run_id, idx, step=step, tokens=step * TOK_PER_STEP)
        time.sleep(interval)


if __name__ == "__main__":
    if sys.argv[1] == "build":
        print("\n".join(build(sys.argv[2])))
    elif sys.argv[1] == "live":
        live(sys.argv[2], sys.argv[3], float(sys.argv[4]) if len(sys.argv) > 4 else 0.5)
