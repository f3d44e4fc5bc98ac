"""cpt_tui.store: versioned migrations (from a real v1 database), WAL, idempotent ingest with offsets,
the latest-metrics table, telemetry retention / downsampling. No training: fast."""

from __future__ import annotations

import json
import sqlite3
import time

from cpt_tui.store import MIGRATIONS, SCHEMA_VERSION, Store


def metric(stage: str, seq: int, step: int, ts: float, loss: float = 2.0) -> dict:
    return {"v": 1, "seq": seq, "ts": ts, "type": "metric", "stage": stage, "step": step, "tokens": step * 256,
            "loss": loss, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0, "total_steps": 100}


def make_run(store: Store, run_id: str = "r1") -> None:
    plan = {"stages": [{"index": 0, "name": "s1", "kind": "cpt", "steps": 10, "tokens": 2560}]}
    store.create_run(run_id, "p", "/p.yaml", "/runs/" + run_id, plan, "host")


def test_migrates_a_version_1_database_and_keeps_its_rows(tmp_path):
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    for sql in MIGRATIONS[0]:
        con.execute(sql)
    con.execute("PRAGMA user_version = 1")
    con.execute("INSERT INTO runs (id, preset, status, run_dir, created) VALUES ('old', 'p', 'done', '/x', 1.0)")
    con.execute("INSERT INTO metrics VALUES ('old', 's1', 1, 10.0, 1, 256, 3.0, 0.1, 1.0, 5.0)")
    con.execute("INSERT INTO metrics VALUES ('old', 's1', 2, 11.0, 2, 512, 2.5, 0.1, 1.0, 6.0)")
    con.commit()
    con.close()

    s = Store(db, readonly=True)  # a reader brings an old database up to date too
    assert s.version() == SCHEMA_VERSION >= 2
    (run,) = s.runs()
    assert (run["id"], run["last_loss"], run["last_step"]) == ("old", 2.5, 2)  # backfilled latest metrics
    s.close()
    s = Store(db)
    assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s.db.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
    assert {"telemetry", "latest_metrics"} <= set(s.db.table_names())
    assert "procs" in s.db["stages"].columns_dict and "options" in s.db["runs"].columns_dict
    s.migrate()  # idempotent
    assert s.version() == SCHEMA_VERSION


def test_ingest_is_idempotent_and_stores_the_offset_atomically(tmp_path):
    s = Store(tmp_path / "db")
    make_run(s)
    recs = [metric("s1", i, i, 100.0 + i, loss=3.0 - i / 10) for i in range(1, 6)]
    assert s.ingest("r1", recs[:3], stage_idx=0, offset=300) == 3
    assert s.ingest("r1", recs, stage_idx=0, offset=500) == 2  # re-reading from an older offset: no duplicates
    assert [m["seq"] for m in s.metrics("r1")] == [1, 2, 3, 4, 5]
    st = s.stages("r1")[0]
    assert (st["events_offset"], st["step"], st["tokens"]) == (500, 5, 5 * 256)
    assert s.runs()[0]["last_step"] == 5 and abs(s.runs()[0]["last_loss"] - 2.5) < 1e-9
    # an older record arriving late does not move the latest metric back
    s.ingest("r2x", [metric("s1", 9, 1, 1.0)])
    s.ingest("r1", [metric("s2", 1, 1, 50.0)])
    assert s.runs()[0]["last_step"] == 5
    # the event stream reads back as the engine wrote it
    evs = s.events_after("r1")
    assert [e["seq"] for e in evs] == [1, 2, 3, 4, 5, 1] and evs[0]["loss"] == recs[0]["loss"]
    assert s.events_after("r1", evs[2]["rowid"])[0]["seq"] == 4


def test_add_event_numbers_its_own_stream(tmp_path):
    s = Store(tmp_path / "db")
    make_run(s)
    a = s.add_event("r1", "@run", "status", state="x")
    b = s.add_event("r1", "@run", "status", state="y")
    assert (a["seq"], b["seq"]) == (1, 2)
    assert [e["state"] for e in s.events_after("r1")] == ["x", "y"]


def test_telemetry_retention_downsamples_old_samples(tmp_path):
    s = Store(tmp_path / "db")
    make_run(s)
    now = time.time()
    base = (now - 7200) // 60 * 60  # two hours ago, on a minute boundary
    old = [{"ts": base + i * 10, "node": "n1", "kind": "host", "index": None,
            "metrics": {"cpu_percent": float(i), "ram_used": 100 + i, "load1": None}} for i in range(12)]
    gpu = [{"ts": base + i * 10, "node": "n1", "kind": "gpu", "index": 0,
            "metrics": {"name": "G", "util_gpu": 50, "power_w": None, "processes": [{"pid": 1}]}} for i in range(6)]
    fresh = [{"ts": now, "node": "n1", "kind": "host", "index": None, "metrics": {"cpu_percent": 9.0}}]
    assert s.add_telemetry("r1", old + gpu + fresh) == 19
    assert s.downsample_telemetry("r1", before=now - 3600, bucket=60) == 18
    rows = s.telemetry("r1")
    host = [r for r in rows if r["kind"] == "host" and r["res"] == 60]
    assert [(r["n"], r["metrics"]["cpu_percent"]) for r in host] == [(6, 2.5), (6, 8.5)]
    assert host[0]["metrics"]["ram_used"] == 102.5 and host[0]["metrics"]["load1"] is None
    (g,) = [r for r in rows if r["kind"] == "gpu"]
    assert (g["idx"], g["n"], g["metrics"]["name"], g["metrics"]["util_gpu"]) == (0, 6, "G", 50)
    assert g["metrics"]["processes"] == [{"pid": 1}] and g["metrics"]["power_w"] is None
    raw = [r for r in rows if r["res"] == 0]
    assert len(raw) == 1 and raw[0]["metrics"] == {"cpu_percent": 9.0}
    assert s.downsample_telemetry("r1", before=now - 3600) == 0  # nothing left to do
    assert json.loads(json.dumps(rows))  # JSON-able for the UI


def test_migration_3_strips_the_key_fields_of_old_ingested_events(tmp_path):
    db = tmp_path / "v2.db"
    con = sqlite3.connect(db)
    for mig in MIGRATIONS[:2]:
        for sql in mig:
            con.execute(sql)
    con.execute("PRAGMA user_version = 2")
    engine_line = json.dumps(metric("s1", 1, 1, 10.0))  # what ingest stored before version 3: the whole line
    con.execute("INSERT INTO events VALUES ('old', 's1', 1, 10.0, 'metric', ?)", [engine_line])
    con.execute("INSERT INTO events VALUES ('old', '@run', 1, 9.0, 'status', ?)", [json.dumps({"state": "running"})])
    con.commit()
    con.close()
    with Store(db) as s:
        assert s.version() == SCHEMA_VERSION >= 3
        evs = {e.stage: e for e in s.events("old")}
        assert evs["s1"].data == {k: v for k, v in metric("s1", 1, 1, 10.0).items()
                                  if k not in ("v", "seq", "ts", "type", "stage")}
        assert evs["@run"].data == {"state": "running"}
        assert [e["loss"] for e in s.events_after("old") if e["stage"] == "s1"] == [2.0]


def test_ingest_and_add_event_store_the_same_encoding(tmp_path):
    with Store(tmp_path / "db") as s:
        make_run(s)
        recs = [metric("s1", 1, 1, 1.0), {"v": 1, "seq": 2, "ts": 2.0, "type": "status", "stage": "s1", "state": "done"}]
        s.ingest("r1", recs[:1], raw=[json.dumps(recs[0])])  # the supervisor's path: raw lines
        s.ingest("r1", recs[1:])  # re-encoded
        s.add_event("r1", "@run", "status", state="done")
        evs = s.events("r1")
        assert [e.data for e in evs][1:] == [{"state": "done"}, {"state": "done"}]
        assert set(evs[0].data) == {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "total_steps"}
        assert [e.type for e in s.events("r1", skip_types=("metric",))] == ["status", "status"]


def test_rows_are_typed_and_read_like_dicts(tmp_path):
    s = Store(tmp_path / "db")
    with s:
        make_run(s)
        s.ingest("r1", [metric("s1", 1, 1, 1.0)])
        run, (stage,), (m,) = s.run("r1"), s.stages("r1"), s.metrics("r1")
        assert run.status == run["status"] == run.get("status") == "queued" and run.get("nope", 7) == 7
        assert (stage.name, stage["steps_total"], m.loss, m["step"]) == ("s1", 10, 2.0, 1)
        assert list(dict(run))[:3] == ["id", "preset", "preset_path"] and "last_loss" not in run
        assert s.runs()[0]["last_loss"] == 2.0 and json.dumps(dict(s.runs()[0]))
        assert s.history_rowid("r1", 0) == s.last_rowid("r1") and s.history_rowid("r1", 5) == 0
        s.delete_run("r1")
        assert s.run("r1") is None and s.metrics("r1") == [] and s.events("r1") == []
    try:
        s.version()
        raise AssertionError("the store is still open")
    except sqlite3.ProgrammingError:
        pass  # closed on leaving the with block


def test_claim_run_refuses_a_live_supervisor_and_takes_over_a_dead_one(tmp_path):
    with Store(tmp_path / "db") as s:
        make_run(s)
        ok, prev = s.claim_run("r1", 100, "h1", lambda row: False)
        assert ok and prev["pid"] is None and (s.run("r1")["pid"], s.run("r1")["host"]) == (100, "h1")
        seen = []
        ok, prev = s.claim_run("r1", 200, "h2", lambda row: seen.append(row["pid"]) or True)  # 100 lives
        assert not ok and seen == [100] and prev["pid"] == 100 and s.run("r1")["pid"] == 100
        ok, _ = s.claim_run("r1", 100, "h1", lambda row: True)  # the same supervisor claims again
        assert ok and s.run("r1")["pid"] == 100
        ok, prev = s.claim_run("r1", 200, "h2", lambda row: False)  # 100 died: 200 adopts the run
        assert ok and prev["pid"] == 100 and (s.run("r1")["pid"], s.run("r1")["host"]) == (200, "h2")
        assert time.time() - s.run("r1")["heartbeat"] < 60
