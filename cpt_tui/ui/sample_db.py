"""Deterministic sample databases: fixed data for UI snapshots and tests, a 1M-point run for the
benchmark, and a live-run simulator (a writer appending metric rows as a supervisor would).

    python -m cpt_tui.ui.sample_db build DB          # the fixed sample runs
    python -m cpt_tui.ui.sample_db live DB RUN_ID    # append metrics to RUN_ID until killed

Rows go through plain SQL on a `Store` (so the schema is the real one, migrations included).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from cpt_tui.store import Store

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


def _insert_stage(c, run_id, stage, idx, steps, upto, ts0, offset, log_every=4, eval_every=24):
    seq = 0
    met, ev, evl = [], [], []
    for step in range(log_every, upto + 1, log_every):
        seq += 1
        g = offset + step
        ts = ts0 + step * 0.35
        lr = 3e-3 * min(1.0, step / 10) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        row = dict(step=step, tokens=step * TOK_PER_STEP, loss=loss_at(g, idx), lr=lr, grad_norm=1.0,
                   tokens_per_s=23000.0 + 500 * math.sin(step))
        met.append((run_id, stage, seq, ts, row["step"], row["tokens"], row["loss"], row["lr"], 1.0,
                    row["tokens_per_s"]))
        ev.append((run_id, stage, seq, ts, "metric", json.dumps(row)))
        if step % eval_every == 0:
            for d, (a, b) in {"prose": (0.0, 0.0), "code": (0.4, 0.0012 * idx)}.items():
                seq += 1
                l = loss_at(g, 0) + a + (0.5 if d == "prose" and idx else 0) - b * step
                evl.append((run_id, stage, seq, ts, step, step * TOK_PER_STEP, d, l))
                ev.append((run_id, stage, seq, ts, "eval", json.dumps({"step": step, "domain": d, "loss": l})))
    c.executemany("INSERT INTO metrics VALUES (?,?,?,?,?,?,?,?,?,?)", met)
    c.executemany("INSERT INTO eval VALUES (?,?,?,?,?,?,?,?)", evl)
    c.executemany("INSERT INTO events VALUES (?,?,?,?,?,?)", ev)
    if met and _has(c, "latest_metrics"):
        last = met[-1]
        c.execute("INSERT OR REPLACE INTO latest_metrics VALUES (?,?,?,?,?,?,?,?,?)", (*last[:8], last[9]))


def _has(c, table: str) -> bool:
    return bool(c.execute("SELECT 1 FROM sqlite_master WHERE name = ?", [table]).fetchone())


def _run(store: Store, run_id, preset, status, stages, progress, t0, run_dir_root: Path, error=None, host="sample"):
    run_dir = run_dir_root / run_id
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    store.create_run(run_id, preset, f"presets/{preset}.yaml", str(run_dir), _plan(stages), host)
    c = store.db.conn
    offset, cur = 0, 0
    c.execute("BEGIN")
    for idx, (name, kind, steps) in enumerate(stages):
        upto = min(steps, max(0, progress - offset))
        st_status = "done" if upto == steps else ("pending" if upto == 0 else ("failed" if error else status))
        if upto:
            cur = idx
            _insert_stage(c, run_id, name, idx, steps, upto, t0 + offset * 0.4, offset)
            (run_dir / "stages" / name).mkdir(exist_ok=True)
            (run_dir / "stages" / name / "train.log").write_text(
                "".join(f"[{name}] step {s}/{steps} loss {loss_at(offset + s, idx):.4f}\n" for s in range(4, upto + 1, 4)))
        c.execute("UPDATE stages SET status = ?, step = ?, tokens = ?, started = ?, finished = ? "
                  "WHERE run_id = ? AND idx = ?",
                  [st_status, upto or None, upto * TOK_PER_STEP or None, t0 + offset * 0.4 if upto else None,
                   t0 + (offset + steps) * 0.4 if st_status == "done" else None, run_id, idx])
        offset += steps
    c.execute("UPDATE runs SET status = ?, started = ?, finished = ?, current_stage = ?, error = ?, heartbeat = ? "
              "WHERE id = ?", [status, t0, t0 + 80 if status in ("done", "failed") else None, cur, error, t0 + 60,
                               run_id])
    for i, (typ, data) in enumerate([("status", {"state": "running"}), ("status", {"state": "stage_started"})]):
        c.execute("INSERT INTO events VALUES (?,?,?,?,?,?)", [run_id, "@run", i + 1, t0 + i, typ, json.dumps(data)])
    if status != "running":
        c.execute("INSERT INTO events VALUES (?,?,?,?,?,?)",
                  [run_id, "@run", 3, t0 + 80, "status", json.dumps({"state": status, **({"reason": error} if error else {})})])
    c.execute("COMMIT")
    (run_dir / "preset.yaml").write_text(f"name: {preset}\ncluster: {{kind: local}}\n")


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
        c = store.db.conn
        c.execute("BEGIN")
        for s in range(2):
            c.executemany("INSERT INTO metrics VALUES (?,?,?,?,?,?,?,?,?,?)",
                          ((run_id, f"s{s}", i, T0 + s * half + i, i, i * 4096,
                            2.5 + 3 * math.exp(-(s * half + i) / 2e5) + 0.05 * math.sin(i), 1e-4, 1.0, 5e4)
                           for i in range(1, half + 1)))
            c.executemany("INSERT INTO eval VALUES (?,?,?,?,?,?,?,?)",
                          ((run_id, f"s{s}", half + 2 * i + j, T0 + s * half + i, i, i * 4096, d, 3.0 - j / 2 - i / half)
                           for i in range(1000, half + 1, 1000) for j, d in enumerate(("en", "code"))))
        c.execute("UPDATE stages SET status = 'done', step = steps_total, tokens = tokens_total WHERE run_id = ?",
                  [run_id])
        c.execute("UPDATE runs SET status = 'done', started = ?, current_stage = 1 WHERE id = ?", [T0, run_id])
        c.execute("COMMIT")
    finally:
        store.close()
    return run_id


def live(db_path: str | Path, run_id: str, interval: float = 0.5, steps: int = 1_000_000) -> None:
    """Append one metric row every `interval` s to the running stage of `run_id` (simulated trainer +
    supervisor), updating the stage's step/tokens as the supervisor does."""
    store = Store(db_path)
    c = store.db.conn
    stages = store.stages(run_id)
    idx = next(i for i, s in enumerate(stages) if s["status"] == "running")
    st = stages[idx]
    step = st["step"] or 0
    seq = c.execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE run_id = ? AND stage = ?",
                    [run_id, st["name"]]).fetchone()[0]
    for _ in range(steps):
        step += 4
        seq += 1
        ts = time.time()
        row = (run_id, st["name"], seq, ts, step, step * TOK_PER_STEP, loss_at(96 + step, idx), 1e-3, 1.0, 23000.0)
        c.execute("BEGIN IMMEDIATE")
        c.execute("INSERT INTO metrics VALUES (?,?,?,?,?,?,?,?,?,?)", row)
        c.execute("INSERT INTO events VALUES (?,?,?,?,?,?)", [*row[:4], "metric", json.dumps({"step": step})])
        if _has(c, "latest_metrics"):
            c.execute("INSERT OR REPLACE INTO latest_metrics VALUES (?,?,?,?,?,?,?,?,?)", (*row[:8], row[9]))
        c.execute("UPDATE stages SET step = ?, tokens = ? WHERE run_id = ? AND idx = ?",
                  [step, step * TOK_PER_STEP, run_id, idx])
        c.execute("COMMIT")
        time.sleep(interval)


if __name__ == "__main__":
    if sys.argv[1] == "build":
        print("\n".join(build(sys.argv[2])))
    elif sys.argv[1] == "live":
        live(sys.argv[2], sys.argv[3], float(sys.argv[4]) if len(sys.argv) > 4 else 0.5)
