"""Rank 0's events.jsonl streamed back over ssh into the manager's run directory (`shared_fs: false`).

A small Python reader runs on the node under the guard (it ends with its ssh channel): it prints a
header line `CPT-STREAM <offset>`, then the file's complete lines from `offset` on, as it grows. It
never sends a torn last line (a trainer killed mid-write): the next attempt's EventWriter truncates
that, and it re-reads from the end of the last line it sent, so what it sent is never cut away. The
manager appends those bytes to its local copy (RUN_DIR/stages/STAGE/events.jsonl), so the local file
is always a byte prefix of the node's: its size is the offset to resume from after a cut connection,
and the supervisor's ingest (offset + seq, idempotent) stays exactly as with a shared run directory.
A dropped channel is reconnected with backoff (0.5 s doubling to 10 s); `finish()` stops following
and fetches whatever is left once the trainer has exited.
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from typing import Callable, Optional

MARK = "cpt-stream"
READER = r"""
import os, sys, time  # cpt-stream
path, off, once = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "once"
out = sys.stdout.buffer
out.write(b"CPT-STREAM %d\n" % off); out.flush()
while not os.path.exists(path):
    if once:
        sys.exit(0)
    time.sleep(0.2)
with open(path, "rb") as f:
    while True:
        f.seek(off)  # whole lines only, read again from the last one sent (see the module docstring)
        b = f.read(1 << 20)
        end = b.rfind(b"\n") + 1
        while not end and len(b) >= 1 << 20:  # a line longer than one read
            more = f.read(1 << 20)
            if not more:
                break
            b += more
            end = b.rfind(b"\n") + 1
        if end:
            out.write(b[:end]); out.flush()
            off += end
        elif once:
            break
        else:
            time.sleep(0.05)
""".strip() + "\n"

BACKOFF_START, BACKOFF_MAX = 0.5, 10.0


class EventStream:
    """Follow `remote_rel` (relative to the node's workdir) into `local`. `command(offset, once)` → a
    started Popen (stdout a pipe) running READER on the node; `note(kind, **data)` queues a state
    change (`connected`, `disconnected`) for the supervisor's thread."""

    def __init__(self, node: str, local: str, command: Callable[[int, bool], subprocess.Popen],
                 note: Callable[..., None]):
        self.node, self.local, self.command, self.note = node, local, command, note
        self.proc: Optional[subprocess.Popen] = None
        self.connected = False
        self.reconnects = 0
        self.bytes = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"stream-{node}", daemon=True)

    def start(self) -> "EventStream":
        self._thread.start()
        return self

    def offset(self) -> int:
        try:
            return os.path.getsize(self.local)
        except FileNotFoundError:
            return 0

    def _copy(self, p: subprocess.Popen, offset: int) -> bool:
        """Copy the reader's bytes after its header into the local file; False if the header is wrong."""
        assert p.stdout is not None
        head = p.stdout.readline()
        if head != b"CPT-STREAM %d\n" % offset:
            return False
        if not self.connected:
            self.connected = True
            self.note("connected", node=self.node, offset=offset, reconnects=self.reconnects)
        with open(self.local, "ab") as f:
            while True:
                chunk = p.stdout.read1(1 << 16)
                if not chunk:
                    return True
                with self._lock:
                    f.write(chunk)
                    f.flush()
                self.bytes += len(chunk)

    def _run(self) -> None:
        wait = BACKOFF_START
        while not self._stop.is_set():
            offset = self.offset()
            t0 = time.monotonic()
            try:
                p = self.proc = self.command(offset, False)
                self._copy(p, offset)
                p.wait()
            except OSError:
                pass
            if self._stop.is_set():
                return
            if self.connected:
                self.connected = False
                self.note("disconnected", node=self.node, offset=self.offset(),
                          reason=f"event stream's ssh channel closed (exit {self.proc.poll() if self.proc else '?'})")
            if time.monotonic() - t0 > 30:
                wait = BACKOFF_START  # it was up for a while: start the backoff over
            self.reconnects += 1
            self._stop.wait(wait)
            wait = min(BACKOFF_MAX, wait * 2)

    def _end_proc(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            try:
                if p.stdin:
                    p.stdin.close()  # the node's guard ends the reader
            except OSError:
                pass
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)

    def stop(self) -> None:
        self._stop.set()
        self._end_proc()
        self._thread.join(30)

    def finish(self, attempts: int = 5) -> None:
        """Stop following, then fetch the rest of the file once (retried with backoff)."""
        self.stop()
        self.fetch_rest(attempts)

    def fetch_rest(self, attempts: int = 5) -> None:
        """Fetch the file's complete lines after the local copy once (retried with backoff), without
        following: what a dead supervisor's stream had not copied yet."""
        wait = BACKOFF_START
        for _ in range(attempts):
            offset = self.offset()
            try:
                p = self.command(offset, True)
                ok = self._copy(p, offset)
                rc = p.wait(60)
                if ok and rc == 0:
                    return
            except (OSError, subprocess.TimeoutExpired):
                pass
            time.sleep(wait)
            wait = min(BACKOFF_MAX, wait * 2)
        self.note("disconnected", node=self.node, offset=self.offset(),
                  reason="could not fetch the end of the event stream")


class Notes:
    """State changes from stream threads, delivered on the supervisor's thread (SQLite is not shared)."""

    def __init__(self):
        self.q: "queue.Queue[tuple[str, dict]]" = queue.Queue()

    def __call__(self, kind: str, **data) -> None:
        self.q.put((kind, data))

    def drain(self) -> list[tuple[str, dict]]:
        out = []
        while True:
            try:
                out.append(self.q.get_nowait())
            except queue.Empty:
                return out
