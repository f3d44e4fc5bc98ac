"""SQLite store (sqlite-utils): runs, stages, metrics, eval, events, telemetry. WAL; one writer, many readers.

The writer is the process running a run (its supervisor); UIs and the CLI read (the CLI writes only
for a run whose supervisor is dead, e.g. `cpt-tui stop` of an orphan). Events are ingested
idempotently: every table keyed on (run, stage, seq) uses INSERT OR IGNORE, so re-reading an
events.jsonl from any offset never duplicates a row. The byte offset reached in each stage's
events.jsonl is stored in the same transaction as the rows, so a new supervisor continues exactly
where a dead one stopped.

`events.data` holds an event's own fields only (the key fields v/seq/ts/type/stage live in their
columns), whether the engine wrote it (ingest) or the manager (add_event).

Reads return typed rows (RunRow, StageRow, ...): attributes, and `row["key"]` / `.get` / `dict(row)`
like the plain dicts they replace. This is the only module that writes SQL.

Schema changes are versioned migrations (PRAGMA user_version): append to MIGRATIONS, never edit one.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from operator import itemgetter
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional

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
    [  # 3: events.data without the key fields (ingest used to store the engine's whole line)
        """UPDATE events SET data = json_remove(data, '$.v', '$.seq', '$.ts', '$.type', '$.stage')
            WHERE json_valid(data) AND json_type(data, '$.seq') IS NOT NULL AND json_type(data, '$.type') IS NOT NULL""",
    ],
    [  # 4: lm-eval benchmark results: one row per (run, stage or base-model, task, metric); a failed task
       # has one row with metric '' and its reason
        """CREATE TABLE IF NOT EXISTS benchmarks (
            run_id TEXT NOT NULL, stage TEXT NOT NULL, task TEXT NOT NULL, metric TEXT NOT NULL DEFAULT '',
            value REAL, stderr REAL, n_shot INTEGER, "limit" REAL, status TEXT NOT NULL, reason TEXT, ts REAL,
            higher_is_better INTEGER, requested TEXT, n_samples INTEGER,
            PRIMARY KEY (run_id, stage, task, metric))""",
    ],
    [  # 5: a scheduler's view of a stage's job (Slurm: {"job", "state", "reason", "nodes"} as JSON)
        "ALTER TABLE stages ADD COLUMN scheduler TEXT",
    ],
    [  # 6: the attempt (launch) of a stage each metric / eval row comes from, and where each attempt
       # resumed: steps redone after a restart are stored again (history) but read once (the latest).
        "ALTER TABLE metrics ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE eval ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1",
        """CREATE TABLE IF NOT EXISTS attempts (
            run_id TEXT NOT NULL, stage TEXT NOT NULL, attempt INTEGER NOT NULL, start_step INTEGER NOT NULL,
            ts REAL, PRIMARY KEY (run_id, stage, attempt))""",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)
TERMINAL = ("done", "failed", "stopped")  # run / stage states after which nothing runs


# --------------------------------------------------------------------------- rows


class Row(Mapping):
    """A typed row that also reads like the dict it replaces: `row.status`, `row["status"]`,
    `row.get("status")`, `dict(row)`. Columns a later migration adds land in `extra` (still readable
    by key), so an older row type never breaks on a newer database."""

    extra: dict

    @classmethod
    def of(cls, d: dict):
        known = cls._fields()
        return cls(**{k: v for k, v in d.items() if k in known},
                   extra={k: v for k, v in d.items() if k not in known})

    @classmethod
    def _fields(cls) -> frozenset:
        f = cls.__dict__.get("_FIELDS")
        if f is None:
            f = frozenset(x.name for x in fields(cls) if x.name != "extra")
            setattr(cls, "_FIELDS", f)
        return f

    def __getitem__(self, key: str) -> Any:
        if key in self._fields():
            return getattr(self, key)
        return self.extra[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self._fields():
            setattr(self, key, value)
        else:
            self.extra[key] = value

    def __iter__(self):
        yield from (f.name for f in fields(self) if f.name != "extra")
        yield from self.extra

    def __len__(self) -> int:
        return len(self._fields()) + len(self.extra)


# Fields in column order (kw_only: required ones need not come first), so dict(row) and JSON keep it.
@dataclass(eq=False, kw_only=True)
class RunRow(Row):
    id: str
    preset: str
    preset_path: Optional[str] = None
    status: str
    run_dir: str
    created: Optional[float] = None
    started: Optional[float] = None
    finished: Optional[float] = None
    error: Optional[str] = None
    host: Optional[str] = None
    pid: Optional[int] = None
    heartbeat: Optional[float] = None
    n_stages: Optional[int] = None
    current_stage: Optional[int] = None
    plan: Optional[str] = None  # JSON
    options: Optional[str] = None  # JSON
    extra: dict = field(default_factory=dict, repr=False)


@dataclass(eq=False, kw_only=True)
class RunSummary(RunRow):
    """A run in a run list: its row and its latest metric."""
    last_loss: Optional[float] = None
    last_tps: Optional[float] = None
    last_step: Optional[int] = None
    last_stage: Optional[str] = None


@dataclass(eq=False, kw_only=True)
class StageRow(Row):
    run_id: str
    idx: int
    name: str
    kind: Optional[str] = None
    status: str
    started: Optional[float] = None
    finished: Optional[float] = None
    steps_total: Optional[int] = None
    tokens_total: Optional[int] = None
    step: Optional[int] = None
    tokens: Optional[int] = None
    exit_code: Optional[int] = None
    attempts: Optional[int] = 0
    events_offset: Optional[int] = 0
    procs: Optional[str] = None  # JSON
    restarts: Optional[int] = 0
    scheduler: Optional[str] = None  # JSON: the scheduler's view of the stage's job (Slurm)
    extra: dict = field(default_factory=dict, repr=False)


@dataclass(eq=False, kw_only=True)
class _Keyed(Row):
    """Rows keyed on (run, stage stream, seq): metrics, eval, events."""
    run_id: str
    stage: str
    seq: int
    ts: Optional[float] = None


@dataclass(eq=False, kw_only=True)
class _AtStep(_Keyed):
    step: Optional[int] = None
    tokens: Optional[int] = None


@dataclass(eq=False, kw_only=True)
class MetricRow(_AtStep):
    loss: Optional[float] = None
    lr: Optional[float] = None
    grad_norm: Optional[float] = None
    tokens_per_s: Optional[float] = None
    attempt: int = 1  # the stage's launch this row comes from (not in MetricRecord: ingest adds it)
    extra: dict = field(default_factory=dict, repr=False)


@dataclass(eq=False, kw_only=True)
class EvalRow(_AtStep):
    domain: Optional[str] = None
    loss: Optional[float] = None
    attempt: int = 1
    extra: dict = field(default_factory=dict, repr=False)


@dataclass(eq=False, kw_only=True)
class BenchmarkRow(Row):
    """One benchmark result: a metric of a task on a stage's export (stage 'base-model': the starting model)."""
    run_id: str
    stage: str
    task: str
    metric: str = ""  # '' for a failed task
    value: Optional[float] = None
    stderr: Optional[float] = None
    n_shot: Optional[int] = None
    limit: Optional[float] = None
    status: str = "ok"
    reason: Optional[str] = None
    ts: Optional[float] = None
    higher_is_better: Optional[bool] = None
    requested: Optional[str] = None
    n_samples: Optional[int] = None
    extra: dict = field(default_factory=dict, repr=False)


@dataclass(eq=False, kw_only=True)
class EventRow(_Keyed):
    """An event with its fields decoded (`data`: the event's own fields, no key fields)."""
    type: Optional[str] = None
    data: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict, repr=False)


def _record(row: type, name: str, **types) -> type:
    """The insert record of a row type: a named tuple of its columns in column order (`types`
    overrides some), which executemany takes as it is (no per-row conversion)."""
    return NamedTuple(name, [(f.name, types.get(f.name, f.type)) for f in fields(row)
                             if f.name not in ("extra", "attempt")])


# What ingest (and the sample databases) insert.
MetricRecord = _record(MetricRow, "MetricRecord")
EvalRecord = _record(EvalRow, "EvalRecord")
EventRecord = _record(EventRow, "EventRecord", data=str)  # data: the JSON text


class MetricBucket(NamedTuple):
    bucket: int
    step: float
    tokens: Optional[float]
    loss: Optional[float]
    lr: Optional[float]
    tokens_per_s: Optional[float]
    n: int


class EvalBucket(NamedTuple):
    domain: Optional[str]
    step: float
    tokens: Optional[float]
    loss: Optional[float]



class Store:
    """`readonly=True`: a reader (UI, CLI); it still brings an old database up to date once.
    A context manager: `with Store(path) as s:` closes it."""

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

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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

    def run(self, run_id: str) -> Optional[RunRow]:
        rows = list(self.db.query("SELECT * FROM runs WHERE id = ?", [run_id]))
        if not rows:  # allow a unique prefix
            rows = list(self.db.query("SELECT * FROM runs WHERE id LIKE ? ORDER BY created DESC", [run_id + "%"]))
            if len(rows) != 1:
                return None
        return RunRow.of(rows[0])

    def runs(self) -> list[RunSummary]:
        """Runs with their latest loss / tokens / throughput (for run lists; one indexed lookup each)."""
        return [RunSummary.of(r) for r in self.db.query("""
            SELECT r.*, m.loss AS last_loss, m.tokens_per_s AS last_tps, m.step AS last_step, m.stage AS last_stage
            FROM runs r LEFT JOIN latest_metrics m ON m.run_id = r.id
            ORDER BY r.created DESC""")]

    def stages(self, run_id: str) -> list[StageRow]:
        return [StageRow.of(r) for r in self.db.query("SELECT * FROM stages WHERE run_id = ? ORDER BY idx", [run_id])]

    def metrics(self, run_id: str, stage: Optional[str] = None, history: bool = False) -> list[MetricRow]:
        """Each step once: a step redone after a restart comes from the latest attempt. `history`:
        every row of every attempt (`attempt` says which)."""
        q, args = "SELECT * FROM metrics m WHERE run_id = ?", [run_id]
        if stage:
            q, args = q + " AND stage = ?", args + [stage]
        if not history:
            q += " AND " + _LATEST.format(t="m")
        return [MetricRow.of(r) for r in self.db.query(q + " ORDER BY ts, seq", args)]

    def evals(self, run_id: str, stage: Optional[str] = None, history: bool = False) -> list[EvalRow]:
        q, args = "SELECT * FROM eval m WHERE run_id = ?", [run_id]
        if stage:
            q, args = q + " AND stage = ?", args + [stage]
        if not history:
            q += " AND " + _LATEST.format(t="m")
        return [EvalRow.of(r) for r in self.db.query(q + " ORDER BY ts, seq", args)]

    def attempts(self, run_id: str) -> list[dict]:
        """(stage, attempt, start_step, ts) of every launch whose trainer began training."""
        return list(self.db.query("SELECT stage, attempt, start_step, ts FROM attempts WHERE run_id = ? "
                                  "ORDER BY ts", [run_id]))

    def events(self, run_id: str, limit: int = 1000, skip_types: tuple[str, ...] = ()) -> list[EventRow]:
        """The latest `limit` events (optionally without some types, e.g. per-step metrics), oldest
        first, in the order they were stored."""
        skip = f" AND type NOT IN ({','.join('?' * len(skip_types))})" if skip_types else ""
        rows = self.db.execute(f"SELECT run_id, stage, seq, ts, type, data FROM events WHERE run_id = ?{skip} "
                               "ORDER BY rowid DESC LIMIT ?", [run_id, *skip_types, limit]).fetchall()
        return [EventRow(run_id=r[0], stage=r[1], seq=r[2], ts=r[3], type=r[4], data=json.loads(r[5]) if r[5] else {})
                for r in reversed(rows)]

    def delete_run(self, run_id: str) -> None:
        """Remove a run's rows from every table (the caller checks it is not running)."""
        c = self.db.conn
        with c:
            c.execute("BEGIN IMMEDIATE")
            for t in RUN_TABLES:
                if self.has_table(t):
                    c.execute(f"DELETE FROM {t} WHERE run_id = ?", [run_id])
            c.execute("DELETE FROM runs WHERE id = ?", [run_id])

    def latest_tokens_per_s(self, preset: str) -> Optional[float]:
        """Throughput of the latest run of this preset that logged any."""
        row = self.db.execute(
            "SELECT m.tokens_per_s FROM runs r JOIN metrics m ON m.run_id = r.id WHERE r.preset = ? "
            "AND m.tokens_per_s > 0 ORDER BY m.ts DESC LIMIT 1", [preset]).fetchone()
        return row[0] if row else None

    def run_dirs(self, preset: str) -> list[str]:
        """The run directories of a preset's runs, newest first."""
        return [r[0] for r in self.db.execute("SELECT run_dir FROM runs WHERE preset = ? ORDER BY created DESC",
                                              [preset])]

    # ------------------------------------------------------------------ ingest
    def ingest(self, run_id: str, records: Iterable[dict], *, stage_idx: Optional[int] = None,
               offset: Optional[int] = None, raw: Optional[list] = None, attempt: int = 1) -> int:
        """Insert event records (idempotent). Returns how many were new.

        With `stage_idx` and `offset`: also store the byte offset reached in that stage's events.jsonl
        and its latest step / tokens, in the same transaction (a crash never loses or skips a record).
        `raw`: the records' JSON lines as read; SQLite strips their key fields (json_remove, in C), which
        is cheaper than re-encoding every record in Python. `attempt`: the stage's launch that wrote
        the records (the supervisor counts them); a trainer's `running` status records where it resumed."""
        ev, met, evl, att = [], [], [], []
        dumps = json.dumps
        for i, r in enumerate(records):
            run, stage, seq, ts, typ = run_id, r["stage"], r["seq"], r["ts"], r["type"]
            data = raw[i] if raw is not None else dumps({k: v for k, v in r.items() if k not in _KEY_FIELDS})
            # EventRecord / MetricRecord / EvalRecord fields, built as plain tuples: a named tuple per
            # row cost ~20 % of ingest's CPU (bench/store.py), and executemany reads tuples fastest.
            ev.append((run, stage, seq, ts, typ, data))
            if typ == "metric":
                g = r.get
                met.append((run, stage, seq, ts, g("step"), g("tokens"), g("loss"), g("lr"), g("grad_norm"),
                            g("tokens_per_s")))
            elif typ == "eval":
                g = r.get
                evl.append((run, stage, seq, ts, g("step"), g("tokens"), g("domain"), g("loss")))
            elif typ == "status" and r.get("state") == "running":
                att.append((run, stage, int(attempt), int(r.get("step") or 0), ts))
        if not ev and offset is None:
            return 0
        c = self.db.conn
        with c:
            c.execute("BEGIN IMMEDIATE")
            before = c.total_changes
            c.executemany(_INSERT_RAW_EVENT if raw is not None else _INSERT_EVENT, ev)
            new = c.total_changes - before
            self._insert_metrics(met, evl, int(attempt))
            if att:
                c.executemany("INSERT OR IGNORE INTO attempts VALUES (?,?,?,?,?)", att)
            if stage_idx is not None and offset is not None:
                sets, args = "events_offset = ?", [offset]
                if met:
                    last = MetricRecord._make(met[-1])
                    sets, args = sets + ", step = ?, tokens = ?", args + [last.step, last.tokens]
                c.execute(f"UPDATE stages SET {sets} WHERE run_id = ? AND idx = ?", [*args, run_id, stage_idx])
        return new

    def _insert_metrics(self, met: list[MetricRecord], evl: Iterable[EvalRecord], attempt: int = 1) -> None:
        """Inside a transaction: metric and eval rows (idempotent, of one attempt), and the run's latest metric."""
        c = self.db.conn
        c.executemany(_INSERT_METRIC if attempt == 1 else _insert("metrics", MetricRecord, extra=("attempt", attempt)), met)
        c.executemany(_INSERT_EVAL if attempt == 1 else _insert("eval", EvalRecord, extra=("attempt", attempt)), evl)
        if met:
            last = MetricRecord._make(max(met, key=_BY_TS))
            c.execute("""INSERT INTO latest_metrics VALUES (?,?,?,?,?,?,?,?,?)
                ON CONFLICT(run_id) DO UPDATE SET stage=excluded.stage, seq=excluded.seq, ts=excluded.ts,
                step=excluded.step, tokens=excluded.tokens, loss=excluded.loss, lr=excluded.lr,
                tokens_per_s=excluded.tokens_per_s WHERE excluded.ts >= latest_metrics.ts""",
                      (*last[:8], last.tokens_per_s))

    def insert_metrics(self, metrics: Iterable[MetricRecord] = (), evals: Iterable[EvalRecord] = ()) -> None:
        """Metric / eval rows without their events (sample and benchmark databases), in one transaction."""
        c = self.db.conn
        with c:
            c.execute("BEGIN IMMEDIATE")
            self._insert_metrics(list(metrics), evals)

    def record_benchmarks(self, run_id: str, stage: str, rows: Iterable[dict]) -> int:
        """Store one evaluation's results (BenchmarkRow fields); they replace earlier rows of the same
        (run, stage, task). Returns the number of rows."""
        cols = [f.name for f in fields(BenchmarkRow) if f.name not in ("extra", "run_id", "stage")]
        recs = []
        for r in rows:
            r = {**r, "metric": r.get("metric") or ""}
            hib = r.get("higher_is_better")
            r["higher_is_better"] = None if hib is None else int(bool(hib))
            recs.append((run_id, stage, *[r.get(c) for c in cols]))
        names = ", ".join(f'"{c}"' for c in ["run_id", "stage", *cols])
        c = self.db.conn
        with c:
            c.execute("BEGIN IMMEDIATE")
            for task in dict.fromkeys(r[2] for r in recs):
                c.execute("DELETE FROM benchmarks WHERE run_id = ? AND stage = ? AND task = ?", [run_id, stage, task])
            c.executemany(f"INSERT OR REPLACE INTO benchmarks ({names}) VALUES ({', '.join('?' * (len(cols) + 2))})",
                          recs)
        return len(recs)

    def benchmarks(self, run_id: str) -> list[BenchmarkRow]:
        """A run's benchmark rows in the order they were recorded ([] on a database without the table)."""
        if not self.has_table("benchmarks"):
            return []
        out = []
        for r in self.db.query("SELECT * FROM benchmarks WHERE run_id = ? ORDER BY rowid", [run_id]):
            if r.get("higher_is_better") is not None:
                r["higher_is_better"] = bool(r["higher_is_better"])
            out.append(BenchmarkRow.of(r))
        return out

    def add_event(self, run_id: str, stage: str, type: str, **data) -> dict:
        """A manager-side event (supervisor transitions), numbered in its own stream (e.g. '@run')."""
        with self.db.conn:
            self.db.execute("BEGIN IMMEDIATE")
            seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE run_id = ? AND stage = ?",
                                  [run_id, stage]).fetchone()[0]
            ts = time.time()
            self.db.execute(_insert("events", EventRecord, "INSERT"), EventRecord(run_id, stage, seq, ts, type,
                                                                                  json.dumps(data)))
        return {"stage": stage, "seq": seq, "ts": ts, "type": type, **data}

    def events_after(self, run_id: str, rowid: int = 0, limit: int = 5000) -> list[dict]:
        """Event records (key fields, data fields and `rowid`) in insertion order, after `rowid`:
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

    def history_rowid(self, run_id: str, n: int) -> int:
        """The rowid after which the run's last `n` events follow (0: from the start)."""
        row = self.db.execute("SELECT rowid FROM events WHERE run_id = ? ORDER BY rowid DESC LIMIT 1 OFFSET ?",
                              [run_id, max(0, n)]).fetchone()
        return row[0] if row else 0

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
        q = ("SELECT step, tokens FROM metrics m WHERE run_id = ? AND stage = ? AND " + _LATEST.format(t="m")
             + " ORDER BY step {} LIMIT 1")
        first = self.db.execute(q.format("ASC"), [run_id, stage]).fetchone()
        if first is None:
            return None
        last = self.db.execute(q.format("DESC"), [run_id, stage]).fetchone()
        return {"first_step": first[0], "last_step": last[0], "last_tokens": last[1]}

    def metric_buckets(self, run_id: str, stage: str, lo: float, hi: float, buckets: int,
                       per_bucket: int = 32) -> list[MetricBucket]:
        """Downsampled metrics of a stage: `buckets` equal step ranges over [lo, hi]; each bucket is the
        mean of its first `per_bucket` rows (exact when it has fewer). One statement, index seeks only,
        so its cost depends on the buckets, not on the rows (1M rows: ~20 ms)."""
        width = max((hi - lo + 1) / max(buckets, 1), 1e-9)
        return [MetricBucket(*r) for r in self.db.execute("""
            WITH RECURSIVE b(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM b WHERE i + 1 < :n)
            SELECT b.i, AVG(m.step), AVG(m.tokens), AVG(m.loss), AVG(m.lr), AVG(m.tokens_per_s), COUNT(*)
            FROM b JOIN metrics m ON m.rowid IN (
                SELECT rowid FROM metrics x WHERE run_id = :run AND stage = :stage
                AND step >= :lo + b.i * :w AND step < :lo + (b.i + 1) * :w AND NOT EXISTS (
                    SELECT 1 FROM attempts a WHERE a.run_id = x.run_id AND a.stage = x.stage
                    AND a.attempt > x.attempt AND a.start_step < x.step)
                ORDER BY step LIMIT :k)
            GROUP BY b.i ORDER BY b.i""",
            {"n": buckets, "run": run_id, "stage": stage, "lo": lo, "w": width, "k": per_bucket})]

    def eval_buckets(self, run_id: str, stage: str, lo: float, hi: float, buckets: int) -> list[EvalBucket]:
        """Validation loss per domain, averaged per step bucket."""
        width = max((hi - lo + 1) / max(buckets, 1), 1e-9)
        return [EvalBucket(*r) for r in self.db.execute("""
            SELECT domain, AVG(step), AVG(tokens), AVG(loss) FROM eval m WHERE run_id = ? AND stage = ?
            AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.run_id = m.run_id AND a.stage = m.stage
                            AND a.attempt > m.attempt AND a.start_step < m.step)
            GROUP BY domain, CAST((step - ?) / ? AS INTEGER) ORDER BY domain, 2""",
            [run_id, stage, lo, width])]

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

RUN_TABLES = ("metrics", "eval", "events", "stages", "telemetry", "latest_metrics", "benchmarks",
              "attempts")  # keyed on run_id
_KEY_FIELDS = frozenset(("v", "seq", "ts", "type", "stage"))  # columns of `events`, not part of its data


def _insert(table: str, record: type, verb: str = "INSERT OR IGNORE", last: str = "?",
            extra: Optional[tuple[str, int]] = None) -> str:
    """An INSERT naming the record's columns (its tuples bind in that order); `last`: the last value;
    `extra`: one more column with a constant integer value."""
    cols, more = ", ".join(record._fields), ""
    if extra:
        cols, more = cols + ", " + extra[0], f", {int(extra[1])}"
    return f"{verb} INTO {table} ({cols}) VALUES (" + "?, " * (len(record._fields) - 1) + last + more + ")"


# A metric / eval row (alias {t}) that no later attempt of its stage has redone: a later attempt that
# resumed at step s redoes every step after s.
_LATEST = ("NOT EXISTS (SELECT 1 FROM attempts a WHERE a.run_id = {t}.run_id AND a.stage = {t}.stage "
           "AND a.attempt > {t}.attempt AND a.start_step < {t}.step)")


_INSERT_METRIC = _insert("metrics", MetricRecord)
_INSERT_EVAL = _insert("eval", EvalRecord)
_INSERT_EVENT = _insert("events", EventRecord)
_INSERT_RAW_EVENT = _insert("events", EventRecord, last="json_remove(?, '$.v', '$.seq', '$.ts', '$.type', '$.stage')")
_BY_TS = itemgetter(MetricRecord._fields.index("ts"))


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
