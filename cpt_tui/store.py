"""SQLite store (sqlite-utils): runs, stages, metrics, eval, events, telemetry. WAL; one writer, many readers.

The writer is the process running a run (its supervisor); UIs and the CLI read (the CLI writes only
for a run whose supervisor is dead, e.g. `cpt-tui stop` of an orphan). Events are ingested
idempotently: every table keyed on (run, stage, seq) uses INSERT OR IGNORE, so re-reading an
events.jsonl from any offset never duplicates a row. The byte offset reached in each stage's
events.jsonl is stored in the same transaction as the rows, so a new supervisor continues exactly
where a dead one stopped.

Schema changes are versioned migrations (PRAGMA user_version): append to MIGRATIONS, never edit one.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Optional

import sqlite_utils


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
    [  # 2: supervision (options, trainer processes), telemetry, latest metrics for run lists
        "ALTER TABLE runs ADD COLUMN options TEXT",  # JSON: max_restarts, backoff, telemetry_interval, cache
        "ALTER TABLE stages ADD COLUMN procs TEXT",  # JSON: the launched processes (pid, start time, exit file)
        "ALTER TABLE stages ADD COLUMN restarts INTEGER DEFAULT 0",
        """CREATE TABLE IF NOT EXISTS telemetry (
            run_id TEXT NOT NULL, node TEXT NOT NULL, kind TEXT NOT NULL, idx INTEGER NOT NULL DEFAULT -1,
            ts REAL NOT NULL, res REAL NOT NULL DEFAULT 0, n INTEGER NOT NULL DEFAULT 1, data TEXT NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS telemetry_run_ts ON telemetry (run_id, res, ts)",
        """CREATE TABLE IF NOT EXISTS latest_metrics (
            run_id TEXT PRIMARY KEY, stage TEXT, seq INTEGER, ts REAL, step INTEGER, tokens INTEGER,
            loss REAL, lr REAL, tokens_per_s REAL)""",
        """INSERT OR REPLACE INTO latest_metrics
            SELECT m.run_id, m.stage, m.seq, m.ts, m.step, m.tokens, m.loss, m.lr, m.tokens_per_s FROM metrics m
            WHERE m.rowid = (SELECT rowid FROM metrics WHERE run_id = m.run_id ORDER BY ts DESC LIMIT 1)""",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)
TERMINAL = ("done", "failed", "stopped")  # run / stage states after which nothing runs


class Store:
    """`readonly=True`: a reader (UI, CLI); it still brings an old database up to date once."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 30000")
        self.db = sqlite_utils.Database(conn)
        if not readonly:
            self.db.enable_wal()
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints, never corrupt
        if not readonly or self.version() < SCHEMA_VERSION:
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
        """Runs with their latest loss / tokens / throughput (for run lists; one indexed lookup each)."""
        return list(self.db.query("""
            SELECT r.*, m.loss AS last_loss, m.tokens_per_s AS last_tps, m.step AS last_step, m.stage AS last_stage
            FROM runs r LEFT JOIN latest_metrics m ON m.run_id = r.id
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
    def ingest(self, run_id: str, records: Iterable[dict], *, stage_idx: Optional[int] = None,
               offset: Optional[int] = None, raw: Optional[list] = None) -> int:
        """Insert event records (idempotent). Returns how many were new.

        With `stage_idx` and `offset`: also store the byte offset reached in that stage's events.jsonl
        and its latest step / tokens, in the same transaction (a crash never loses or skips a record).
        `raw`: the records' JSON lines as read (then stored as they are, instead of re-encoding them)."""
        ev, met, evl = [], [], []
        dumps = json.dumps
        for i, r in enumerate(records):
            key = (run_id, r["stage"], r["seq"])
            data = raw[i] if raw is not None else dumps({k: v for k, v in r.items() if k not in _KEY_FIELDS})
            ev.append((*key, r["ts"], r["type"], data))
            if r["type"] == "metric":
                met.append((*key, r["ts"], r.get("step"), r.get("tokens"), r.get("loss"), r.get("lr"),
                            r.get("grad_norm"), r.get("tokens_per_s")))
            elif r["type"] == "eval":
                evl.append((*key, r["ts"], r.get("step"), r.get("tokens"), r.get("domain"), r.get("loss")))
        if not ev and offset is None:
            return 0
        c = self.db.conn
        with c:
            c.execute("BEGIN IMMEDIATE")
            before = c.total_changes
            c.executemany("INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?)", ev)
            new = c.total_changes - before
            c.executemany("INSERT OR IGNORE INTO metrics VALUES (?,?,?,?,?,?,?,?,?,?)", met)
            c.executemany("INSERT OR IGNORE INTO eval VALUES (?,?,?,?,?,?,?,?)", evl)
            if met:
                last = max(met, key=lambda m: m[3])
                c.execute("""INSERT INTO latest_metrics VALUES (?,?,?,?,?,?,?,?,?)
                    ON CONFLICT(run_id) DO UPDATE SET stage=excluded.stage, seq=excluded.seq, ts=excluded.ts,
                    step=excluded.step, tokens=excluded.tokens, loss=excluded.loss, lr=excluded.lr,
                    tokens_per_s=excluded.tokens_per_s WHERE excluded.ts >= latest_metrics.ts""",
                          (*last[:8], last[9]))
            if stage_idx is not None and offset is not None:
                sets, args = "events_offset = ?", [offset]
                if met:
                    sets, args = sets + ", step = ?, tokens = ?", args + [met[-1][4], met[-1][5]]
                c.execute(f"UPDATE stages SET {sets} WHERE run_id = ? AND idx = ?", [*args, run_id, stage_idx])
        return new

    def add_event(self, run_id: str, stage: str, type: str, **data) -> dict:
        """A manager-side event (supervisor transitions), numbered in its own stream (e.g. '@run')."""
        with self.db.conn:
            self.db.execute("BEGIN IMMEDIATE")
            seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE run_id = ? AND stage = ?",
                                  [run_id, stage]).fetchone()[0]
            ts = time.time()
            self.db.execute("INSERT INTO events VALUES (?,?,?,?,?,?)",
                            [run_id, stage, seq, ts, type, json.dumps(data)])
        return {"stage": stage, "seq": seq, "ts": ts, "type": type, **data}

    def events_after(self, run_id: str, rowid: int = 0, limit: int = 5000) -> list[dict]:
        """Event records (as the engine wrote them, plus `rowid`) in insertion order, after `rowid`:
        what `attach` follows."""
        out = []
        for row in self.db.execute("SELECT rowid, stage, seq, ts, type, data FROM events WHERE run_id = ? "
                                   "AND rowid > ? ORDER BY rowid LIMIT ?", [run_id, rowid, limit]).fetchall():
            rec = json.loads(row[5]) if row[5] else {}
            rec.update(rowid=row[0], stage=row[1], seq=row[2], ts=row[3], type=row[4])
            out.append(rec)
        return out

    def last_rowid(self, run_id: str) -> int:
        return self.db.execute("SELECT COALESCE(MAX(rowid), 0) FROM events WHERE run_id = ?", [run_id]).fetchone()[0]

    # ------------------------------------------------------------------ telemetry
    def add_telemetry(self, run_id: str, samples: Iterable[dict]) -> int:
        """Raw samples as `python -m engine.telemetry` prints them ({ts, node, kind, index, metrics})."""
        rows = [(run_id, s["node"], s["kind"], -1 if s.get("index") is None else s["index"], s["ts"], 0, 1,
                 json.dumps(s["metrics"])) for s in samples]
        if rows:
            with self.db.conn:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.conn.executemany("INSERT INTO telemetry VALUES (?,?,?,?,?,?,?,?)", rows)
        return len(rows)

    def telemetry(self, run_id: str, node: Optional[str] = None, since: float = 0.0) -> list[dict]:
        """Samples (raw: res 0; downsampled: res = bucket seconds, n = samples averaged), oldest first."""
        q, args = "SELECT * FROM telemetry WHERE run_id = ? AND ts >= ?", [run_id, since]
        if node:
            q, args = q + " AND node = ?", args + [node]
        out = []
        for r in self.db.query(q + " ORDER BY ts, node, kind, idx", args):
            r["metrics"] = json.loads(r.pop("data"))
            out.append(r)
        return out

    def downsample_telemetry(self, run_id: str, before: float, bucket: float = 60.0) -> int:
        """Replace raw samples older than `before` by one row per (node, kind, index, bucket): numeric
        fields averaged, others (GPU name, process list) from the last sample. Returns rows removed."""
        c = self.db.conn
        with c:
            c.execute("BEGIN IMMEDIATE")
            raw = c.execute("SELECT rowid, node, kind, idx, ts, data FROM telemetry WHERE run_id = ? AND res = 0 "
                            "AND ts < ? ORDER BY ts", [run_id, before]).fetchall()
            if not raw:
                return 0
            groups: dict[tuple, list] = {}
            for _, node, kind, idx, ts, data in raw:
                groups.setdefault((node, kind, idx, int(ts // bucket)), []).append(json.loads(data))
            rows = []
            for (node, kind, idx, b), samples in groups.items():
                rows.append((run_id, node, kind, idx, b * bucket, bucket, len(samples), json.dumps(_mean(samples))))
            c.executemany("INSERT INTO telemetry VALUES (?,?,?,?,?,?,?,?)", rows)
            c.executemany("DELETE FROM telemetry WHERE rowid = ?", [(r[0],) for r in raw])
        return len(raw)

    def close(self) -> None:
        self.db.conn.close()

    # ------------------------------------------------------------------ UI queries (read-only)
    def has_table(self, name: str) -> bool:
        return bool(self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [name]).fetchone())

    def metric_extent(self, run_id: str, stage: str) -> Optional[dict]:
        """First and last logged step of a stage, and the tokens at the last one (index seeks only)."""
        q = "SELECT step, tokens FROM metrics WHERE run_id = ? AND stage = ? ORDER BY step {} LIMIT 1"
        first = self.db.execute(q.format("ASC"), [run_id, stage]).fetchone()
        if first is None:
            return None
        last = self.db.execute(q.format("DESC"), [run_id, stage]).fetchone()
        return {"first_step": first[0], "last_step": last[0], "last_tokens": last[1]}

    def metric_buckets(self, run_id: str, stage: str, lo: float, hi: float, buckets: int,
                       per_bucket: int = 32) -> list[tuple]:
        """Downsampled metrics of a stage: `buckets` equal step ranges over [lo, hi]; each bucket is the
        mean of its first `per_bucket` rows (exact when it has fewer). One statement, index seeks only,
        so its cost depends on the buckets, not on the rows (1M rows: ~20 ms).
        Rows: (bucket, step, tokens, loss, lr, tokens_per_s, n)."""
        width = max((hi - lo + 1) / max(buckets, 1), 1e-9)
        return self.db.execute("""
            WITH RECURSIVE b(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM b WHERE i + 1 < :n)
            SELECT b.i, AVG(m.step), AVG(m.tokens), AVG(m.loss), AVG(m.lr), AVG(m.tokens_per_s), COUNT(*)
            FROM b JOIN metrics m ON m.rowid IN (
                SELECT rowid FROM metrics WHERE run_id = :run AND stage = :stage
                AND step >= :lo + b.i * :w AND step < :lo + (b.i + 1) * :w ORDER BY step LIMIT :k)
            GROUP BY b.i ORDER BY b.i""",
            {"n": buckets, "run": run_id, "stage": stage, "lo": lo, "w": width, "k": per_bucket}).fetchall()

    def eval_buckets(self, run_id: str, stage: str, lo: float, hi: float, buckets: int) -> list[tuple]:
        """Validation loss per domain, averaged per step bucket. Rows: (domain, step, tokens, loss)."""
        width = max((hi - lo + 1) / max(buckets, 1), 1e-9)
        return self.db.execute("""
            SELECT domain, AVG(step), AVG(tokens), AVG(loss) FROM eval WHERE run_id = ? AND stage = ?
            GROUP BY domain, CAST((step - ?) / ? AS INTEGER) ORDER BY domain, 2""",
            [run_id, stage, lo, width]).fetchall()

    def telemetry_recent(self, run_id: Optional[str], seconds: float = 300.0, limit: int = 5000) -> list[dict]:
        """The last `seconds` of telemetry before the newest sample (of a run, or of every run), oldest
        first; [] when the database has no telemetry table."""
        if not self.has_table("telemetry"):
            return []
        where, args = ("WHERE run_id = ?", [run_id]) if run_id else ("", [])
        newest = self.db.execute(f"SELECT MAX(ts) FROM telemetry {where}", args).fetchone()[0]
        if newest is None:
            return []
        cond = (where + " AND" if where else "WHERE") + " ts >= ?"
        rows = self.db.execute(f"SELECT run_id, node, kind, idx, ts, data FROM telemetry {cond} "
                               f"ORDER BY ts DESC LIMIT ?", [*args, newest - seconds, limit]).fetchall()
        return [{"run_id": r[0], "node": r[1], "kind": r[2], "idx": r[3], "ts": r[4], "metrics": json.loads(r[5])}
                for r in reversed(rows)]

    # ------------------------------------------------------------------ supervision (owned by the launch slice)
    def claim_run(self, run_id: str, pid: int, host: str, is_alive) -> tuple[bool, dict]:
        """Record (pid, host) as the run's supervisor unless `is_alive(row)` says another one lives
        (atomic: BEGIN IMMEDIATE). Returns (claimed, the run's row as it was)."""
        with self.db.conn:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.run(run_id)
            if row["pid"] != pid and is_alive(row):
                return False, row
            self.db.execute("UPDATE runs SET pid = ?, host = ?, heartbeat = ? WHERE id = ?",
                            [pid, host, time.time(), run_id])
        return True, row

    def last_status(self, run_id: str, stage: str, since: float) -> tuple[Optional[str], Optional[str]]:
        """(state, reason) of the stage's newest 'status' event at or after `since`, else (None, None)."""
        row = self.db.execute(
            "SELECT data FROM events WHERE run_id = ? AND stage = ? AND type = 'status' AND ts >= ? "
            "ORDER BY seq DESC LIMIT 1", [run_id, stage, since]).fetchone()
        data = json.loads(row[0]) if row else {}
        return data.get("state"), data.get("reason")

    def active_runs(self) -> list[dict]:
        """Runs whose status says something should be running ('running', 'queued')."""
        return list(self.db.query("SELECT * FROM runs WHERE status IN ('running', 'queued')"))

_KEY_FIELDS = frozenset(("v", "seq", "ts", "type", "stage"))


def _mean(samples: list[dict]) -> dict:
    out: dict = {}
    for k in samples[-1]:
        vals = [s.get(k) for s in samples]
        nums = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if nums and len(nums) == len([v for v in vals if v is not None]):
            out[k] = sum(nums) / len(nums)
        else:
            out[k] = samples[-1][k]
    return out
