"""The event log: append-only `events.jsonl`, one JSON object per line, each with a sequence number.

Schema v1 (every record): {"v": 1, "seq": int, "ts": float, "type": str, "stage": str, ...}
  type "status"     state: starting|running|done|failed|stopped, [reason], [exit_code]
  type "metric"     step, tokens, loss, lr, grad_norm, tokens_per_s, [elapsed]
  type "eval"       step, tokens, domain, loss, [blocks]
  type "checkpoint" step, path
  type "warning"    message, [kind]   (e.g. kind "loss_spike", "nan")
  type "error"      message
  type "progress"   free-form counters (data preparation)
The manager ingests these into SQLite keyed on (run, stage, seq), so re-reading a file is harmless.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

EVENT_VERSION = 1
EVENT_TYPES = ("status", "metric", "eval", "checkpoint", "warning", "error", "progress")


def _last_seq(path: Path) -> int:
    """The last complete record's seq (a torn last line from a crash is ignored)."""
    if not path.exists():
        return 0
    last = 0
    with open(path, "rb") as f:
        for line in f:
            if line.endswith(b"\n"):
                try:
                    last = json.loads(line)["seq"]
                except (ValueError, KeyError):
                    pass
    return last


class EventWriter:
    """Appends events; continues the sequence after a restart. Writes are line-atomic and flushed."""

    def __init__(self, path: str | Path, stage: str, enabled: bool = True):
        self.path = Path(path)
        self.stage = stage
        self.enabled = enabled
        self.seq = 0
        self._f = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._truncate_torn_tail()
            self.seq = _last_seq(self.path)
            self._f = open(self.path, "ab", buffering=0)

    def _truncate_torn_tail(self) -> None:
        if self.path.exists() and self.path.stat().st_size:
            data = self.path.read_bytes()
            if not data.endswith(b"\n"):
                with open(self.path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)

    def emit(self, type: str, **fields) -> None:
        if not self.enabled:
            return
        assert type in EVENT_TYPES, type
        self.seq += 1
        rec = {"v": EVENT_VERSION, "seq": self.seq, "ts": time.time(), "type": type, "stage": self.stage, **fields}
        self._f.write((json.dumps(rec, allow_nan=True) + "\n").encode())

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
