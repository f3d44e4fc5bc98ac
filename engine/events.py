"""The event log: append-only `events.jsonl`, one JSON object per line, each with a sequence number.

Event schema v1 — the one place it is defined (`SCHEMA` below is the machine-readable copy;
`validate_event` checks a record against it and the tests run it over every event they see).

Every record: {"v": 1, "seq": int ≥ 1, increasing per file, "ts": float (unix seconds),
               "type": str, "stage": str, ...type fields}
  status      state: starting|running|done|failed|stopped
              [reason] [exit_code] [step] [total_steps] [tokens] [world_size] [grad_accum]
              [threads] (torch intra-op threads per process) [resumed_from] [export]
              [loss] on "running": "fused" (engine/loss.py) or "standard (why)"
              exit_code 75 = stopped by SIGTERM after a checkpoint, resumable
  metric      step, tokens, loss, lr, grad_norm|null, tokens_per_s, total_steps,
              [data_wait_s] (seconds spent fetching batches since the last metric)
              [step_time_s] (mean wall seconds per step since the last metric)
              [cpu_s] (this process's CPU seconds since the last metric) [elapsed] [skipped]
  eval        step, tokens, domain, loss (mean per predicted token), blocks
  checkpoint  step, path, [tokens]
  warning     message, [kind]: nan | loss_spike | precision | overflow | vocabulary | config | ...
              [step] [loss] [mean]
  relora      step, action: switch (warm start ends) | merge, [delta_norm] [merges]
  error       message
  progress    free-form counters (data preparation)
  benchmark   task, status: ok|failed, [requested] [metric] [value] [stderr] [n_shot] [limit] [n_samples]
              [reason] [model] [seconds] — engine/evaluate.py: one per metric of an ok task, one per
              failed task (no metric)
"steps" count optimizer steps (1-based in metric/eval/checkpoint: the steps done so far);
"tokens" count training tokens consumed by the whole job (all processes).
The manager ingests these into SQLite keyed on (run, stage, seq), so re-reading a file is harmless.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

EVENT_VERSION = 1

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
COMMON = {"v": int, "seq": int, "ts": _NUM, "type": str, "stage": str}
# type -> (required fields, optional fields); values are accepted Python types.
SCHEMA: dict[str, tuple[dict, dict]] = {
    "status": ({"state": str}, {"reason": str, "exit_code": int, "step": int, "total_steps": int, "tokens": int,
                                "world_size": int, "grad_accum": int, "threads": int, "resumed_from": (str, type(None)),
                                "export": str, "loss": str, "device": str, "dtype": str}),
    "metric": ({"step": int, "tokens": int, "loss": _NUM, "lr": _NUM, "grad_norm": _OPT_NUM,
                "tokens_per_s": _NUM, "total_steps": int},
               {"data_wait_s": _NUM, "step_time_s": _NUM, "cpu_s": _NUM, "elapsed": _NUM, "skipped": int}),
    "eval": ({"step": int, "tokens": int, "domain": str, "loss": _NUM, "blocks": int}, {}),
    "checkpoint": ({"step": int, "path": str}, {"tokens": int}),
    "warning": ({"message": str}, {"kind": str, "step": int, "loss": _OPT_NUM, "mean": _OPT_NUM}),
    "relora": ({"step": int, "action": str}, {"delta_norm": _NUM, "merges": int}),
    "error": ({"message": str}, {}),
    "progress": ({}, None),  # None: any further fields
    "benchmark": ({"task": str, "status": str},
                  {"requested": str, "metric": str, "value": _OPT_NUM, "stderr": _OPT_NUM, "n_shot": (int, type(None)),
                   "limit": _OPT_NUM, "n_samples": (int, type(None)), "reason": str, "model": str, "seconds": _NUM}),
}
EVENT_TYPES = tuple(SCHEMA)
STATUS_STATES = ("starting", "running", "done", "failed", "stopped")


def validate_event(rec: dict) -> list[str]:
    """Problems of one record against schema v1 ([] when valid)."""
    errs = []

    def check(name, types, required):
        if name not in rec:
            if required:
                errs.append(f"missing field {name!r}")
            return
        v = rec[name]
        if isinstance(v, bool) or not isinstance(v, types):
            errs.append(f"field {name!r} has type {type(v).__name__}")

    for k, t in COMMON.items():
        check(k, t, True)
    if errs:
        return errs
    if rec["v"] != EVENT_VERSION:
        return [f"version {rec['v']} is not {EVENT_VERSION}"]
    if rec["type"] not in SCHEMA:
        return [f"unknown type {rec['type']!r}"]
    required, optional = SCHEMA[rec["type"]]
    for k, t in required.items():
        check(k, t, True)
    for k, t in (optional or {}).items():
        check(k, t, False)
    if optional is not None:
        extra = set(rec) - set(COMMON) - set(required) - set(optional)
        errs += [f"unknown field {k!r} for type {rec['type']!r}" for k in sorted(extra)]
    if rec["type"] == "status" and rec.get("state") not in STATUS_STATES:
        errs.append(f"unknown status state {rec.get('state')!r}")
    if rec["type"] == "benchmark" and rec.get("status") not in ("ok", "failed"):
        errs.append(f"unknown benchmark status {rec.get('status')!r}")
    if rec["type"] == "relora" and rec.get("action") not in ("switch", "merge"):
        errs.append(f"unknown relora action {rec.get('action')!r}")
    return errs


def validate_log(records: list[dict]) -> list[str]:
    """Schema problems of a whole file, plus sequence numbers that do not increase by one."""
    errs = [f"seq {r.get('seq')}: {e}" for r in records for e in validate_event(r)]
    seqs = [r.get("seq") for r in records]
    if seqs != list(range(1, len(seqs) + 1)):
        errs.append(f"sequence numbers are not 1..{len(seqs)}")
    return errs


def _scan(path: Path) -> tuple[int, int]:
    """(the last complete record's seq, the last step a metric / eval record logged or -1), in one pass;
    a torn last line from a crash is ignored."""
    last, logged = 0, -1
    if not path.exists():
        return last, logged
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            last = rec.get("seq", last)
            if rec.get("type") in ("metric", "eval"):
                logged = max(logged, int(rec["step"]))
    return last, logged


def _finite(v):
    # JSON has no NaN/Infinity: non-finite numbers (a diverged loss) are written as null.
    return None if isinstance(v, float) and not math.isfinite(v) else v


class EventWriter:
    """Appends events; continues the sequence after a restart. Writes are line-atomic and flushed."""

    def __init__(self, path: str | Path, stage: str, enabled: bool = True):
        self.path = Path(path)
        self.stage = stage
        self.enabled = enabled
        self.seq = 0
        self.logged_upto = -1  # the last step an earlier attempt logged a metric / eval for (engine/trackers.py)
        self._f = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._truncate_torn_tail()
            self.seq, self.logged_upto = _scan(self.path)
            self._f = open(self.path, "ab", buffering=0)

    def _truncate_torn_tail(self) -> None:
        if not self.path.exists() or not self.path.stat().st_size:
            return
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":  # the usual case: nothing torn, nothing more to read
                return
        data = self.path.read_bytes()
        with open(self.path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)

    def emit(self, type: str, **fields) -> None:
        if not self.enabled:
            return
        assert type in SCHEMA, type
        self.seq += 1
        rec = {"v": EVENT_VERSION, "seq": self.seq, "ts": time.time(), "type": type, "stage": self.stage,
               **{k: _finite(v) for k, v in fields.items()}}
        self._f.write((json.dumps(rec) + "\n").encode())

    def sync(self) -> None:
        if self._f:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f:
            self.sync()
            self._f.close()
            self._f = None


def read_events(path: str | Path, offset: int = 0) -> tuple[list[dict], int]:
    """Complete records from byte `offset`; returns them and the offset after the last one."""
    path = Path(path)
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    out = []
    for line in data[:end].splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out, offset + end
