"""SQLite store (sqlite-utils): runs, stages, metrics, eval, events. WAL; one writer, many readers.

The writer is the process running a run (the supervisor); UIs and the CLI only read. Events are
ingested idempotently: every table keyed on (run, stage, seq) uses INSERT OR IGNORE, so re-reading
an events.jsonl from any offset never duplicates a row.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Optional

import sqlite_utils

SCHEMA_VERSION = 1

# Each migration takes the schema from version i to i+1. Append; never edit a released one.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE IF NOT EXISTS runs (
            id TEXT PRIMARY KEY, preset TEXT NOT NULL, preset_path TEXT, status TEXT NOT NULL,
            run_dir TEXT NOT NULL, created REAL, started REAL, finished REAL, error TEXT,
            host TEXT, pid INTEGER, heartbeat REAL, n_stages INTEGER, current_stage INTEGER,
            plan TEXT)""",
        """CREATE TABLE IF NOT EXISTS stages (
            run_id TEXT NOT NULL, idx INTEGER NOT NULL, name TEXT NOT NULL, kind TEXT, status TEXT NOT NULL,
            started REAL, finished REAL, steps_total INTEGER, tokens_total INTEGER, step INTEGER,
            tokens INTEGER, exit_code INTEGER, attempts INTEGER DEFAULT 0, events_offset INTEGER DEFAULT 0,
            PRIMARY KEY (run_id, idx))""",
        """CREATE TABLE IF NOT EXISTS metrics (
            run_id TEXT NOT NULL, stage TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL, step INTEGER,
            tokens INTEGER, loss REAL, lr REAL, grad_norm REAL, tokens_per_s REAL,
            PRIMARY KEY (run_id, stage, seq))""",
        """CREATE TABLE IF NOT EXISTS eval (
            run_id TEXT NOT NULL, stage TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL, step INTEGER,
            tokens INTEGER, domain TEXT, loss REAL, PRIMARY KEY (run_id, stage, seq))""",
        """CREATE TABLE IF NOT EXISTS events (
            run_id TEXT NOT NULL, stage TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL, type TEXT,
            data TEXT, PRIMARY KEY (run_id, stage, seq))""",
        "CREATE INDEX IF NOT EXISTS metrics_run_step ON metrics (run_id, stage, step)",
    ],
]


class Store:
    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 30000")
        self.db = sqlite_utils.Database(conn)
        if not readonly:
            self.db.enable_wal()
            self.migrate()

    # ------------------------------------------------------------------ schema
    def version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def migrate(self) -> None:
        v = self.version()
        for i in range(v, len(MIGRATIONS)):
            with self.db.conn:
                self.db.execute("BEGIN IMMEDIATE")
                if self.version() > i:  # another process migrated meanwhile
                    continue
                for sql in MIGRATIONS[i]:
                    self.db.execute(sql)
                self.db.execute(f"PRAGMA user_version = {i + 1}")

    # ------------------------------------------------------------------ runs
    def create_run(self, run_id: str, preset: str, preset_path: str, run_dir: str, plan: dict, host: str) -> None:
        now = time.time()
        self.db["runs"].insert({
            "id": run_id, "preset": preset, "preset_path": preset_path, "status": "queued", "run_dir": run_dir,
            "created": now, "host": host, "n_stages": len(plan["stages"]), "current_stage": None,
            "plan": json.dumps(plan),
        })
        self.db["stages"].insert_all([{
            "run_id": run_id, "idx": s["index"], "name": s["name"], "kind": s["kind"], "status": "pending",
            "steps_total": s["steps"], "tokens_total": s["tokens"],
        } for s in plan["stages"]])

    def update_run(self, run_id: str, **fields) -> None:
        self.db["runs"].update(run_id, fields)

    def update_stage(self, run_id: str, idx: int, **fields) -> None:
        self.db["stages"].update((run_id, idx), fields)

    def run(self, run_id: str) -> Optional[dict]:
        rows = list(self.db.query("SELECT * FROM runs WHERE id = ?", [run_id]))
        if not rows:  # allow a unique prefix
            rows = list(self.db.query("SELECT * FROM runs WHERE id LIKE ? ORDER BY created DESC", [run_id + "%"]))
            if len(rows) != 1:
                return None
        return rows[0]

    def runs(self) -> list[dict]:
        """Runs with their latest loss / tokens / throughput (for run lists)."""
        return list(self.db.query("""
            SELECT r.*, m.loss AS last_loss, m.tokens_per_s AS last_tps, m.step AS last_step, m.stage AS last_stage
            FROM runs r LEFT JOIN metrics m ON m.rowid = (
                SELECT rowid FROM metrics WHERE run_id = r.id ORDER BY ts DESC LIMIT 1)
            ORDER BY r.created DESC"""))

    def stages(self, run_id: str) -> list[dict]:
        return list(self.db.query("SELECT * FROM stages WHERE run_id = ? ORDER BY idx", [run_id]))

    def metrics(self, run_id: str, stage: Optional[str] = None) -> list[dict]:
        q, args = "SELECT * FROM metrics WHERE run_id = ?", [run_id]
        if stage:
            q, args = q + " AND stage = ?", args + [stage]
        return list(self.db.query(q + " ORDER BY ts, seq", args))

    def evals(self, run_id: str, stage: Optional[str] = None) -> list[dict]:
        q, args = "SELECT * FROM eval WHERE run_id = ?", [run_id]
        if stage:
            q, args = q + " AND stage = ?", args + [stage]
        return list(self.db.query(q + " ORDER BY ts, seq", args))

    def events(self, run_id: str, limit: int = 1000) -> list[dict]:
        return list(self.db.query(
            "SELECT * FROM (SELECT * FROM events WHERE run_id = ? ORDER BY ts DESC LIMIT ?) ORDER BY ts", [run_id, limit]))

    # ------------------------------------------------------------------ ingest
    def ingest(self, run_id: str, records: Iterable[dict]) -> int:
        """Insert event records (idempotent). Returns how many were new."""
        ev, met, evl = [], [], []
        for r in records:
            key = (run_id, r["stage"], r["seq"])
            data = {k: v for k, v in r.items() if k not in ("v", "seq", "ts", "type", "stage")}
            ev.append((*key, r["ts"], r["type"], json.dumps(data)))
            if r["type"] == "metric":
                met.append((*key, r["ts"], r.get("step"), r.get("tokens"), r.get("loss"), r.get("lr"),
                            r.get("grad_norm"), r.get("tokens_per_s")))
            elif r["type"] == "eval":
                evl.append((*key, r["ts"], r.get("step"), r.get("tokens"), r.get("domain"), r.get("loss")))
        if not ev:
            return 0
        c = self.db.conn
        with c:
            c.execute("BEGIN IMMEDIATE")
            before = c.total_changes
            c.executemany("INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?)", ev)
            new = c.total_changes - before
            c.executemany("INSERT OR IGNORE INTO metrics VALUES (?,?,?,?,?,?,?,?,?,?)", met)
            c.executemany("INSERT OR IGNORE INTO eval VALUES (?,?,?,?,?,?,?,?)", evl)
        return new

    def add_event(self, run_id: str, stage: str, type: str, **data) -> None:
        """A manager-side event (supervisor transitions), numbered in its own 'run' stream."""
        with self.db.conn:
            self.db.execute("BEGIN IMMEDIATE")
            seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE run_id = ? AND stage = ?",
                                  [run_id, stage]).fetchone()[0]
            self.db.execute("INSERT INTO events VALUES (?,?,?,?,?,?)",
                            [run_id, stage, seq, time.time(), type, json.dumps(data)])

    def close(self) -> None:
        self.db.conn.close()
