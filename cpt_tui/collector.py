"""What the supervisor collects from a run's processes besides exit codes: event lines (read from a
file by byte offset) and node telemetry (`python -m engine.telemetry` per node, started through the
run's backend, read line by line)."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from pathlib import Path

from cpt_tui.backends import Backend, NodeCommand
from cpt_tui.procs import terminate


def read_lines(path: Path, offset: int, limit: int = 8 << 20) -> tuple[list[dict], list[str], int]:
    """Like engine.events.read_events (complete lines from `offset`, at most `limit` bytes per call),
    also returning each record's line, stored as is."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(limit)
    except FileNotFoundError:
        return [], [], offset
    end = data.rfind(b"\n") + 1
    raw = [line for line in data[:end].decode().split("\n") if line.strip()]
    return [json.loads(line) for line in raw], raw, offset + end


class Telemetry:
    """One sampler per node (over ssh for remote nodes), restarted when its channel drops."""

    RESTART_S = 30.0

    def __init__(self, backend: Backend, interval: float, log):
        self.backend, self.interval, self.log = backend, interval, log
        self.cmds = backend.telemetry_commands(interval)
        self.samples: "queue.Queue[dict]" = queue.Queue()
        self.procs: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}

    def _start(self, cmd: NodeCommand) -> None:
        p = self.backend.start_telemetry(cmd, stdout=subprocess.PIPE, stderr=self.log)
        self.procs[cmd.node], self.started[cmd.node] = p, time.monotonic()
        threading.Thread(target=self._read, args=(p,), daemon=True).start()

    def _read(self, p: subprocess.Popen) -> None:
        for line in p.stdout:
            try:
                self.samples.put(json.loads(line))
            except ValueError:
                pass

    def check(self) -> None:
        """(Re)start samplers that are not running (an ssh channel dropped), at most every RESTART_S."""
        for cmd in self.cmds:
            p = self.procs.get(cmd.node)
            if p is None or (p.poll() is not None and time.monotonic() - self.started[cmd.node] > self.RESTART_S):
                self._start(cmd)

    def drain(self) -> list[dict]:
        out = []
        while True:
            try:
                out.append(self.samples.get_nowait())
            except queue.Empty:
                return out

    def stop(self) -> None:
        terminate(list(self.procs.values()), timeout=10, kill_after=2)
