"""The node-side reader of the event stream (cpt_tui/backends/stream.py READER), run as the real
subprocess on a local file: it sends complete lines only, so after a trainer killed mid-write and the
next attempt's EventWriter truncating the torn line, the manager's copy is still a byte prefix of the
node's file, and the whole log arrives exactly once."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from cpt_tui.backends.stream import READER
from engine.events import EventWriter, read_events


@pytest.fixture(autouse=True)
def _readers():
    """Readers that a failing test leaves following are ended."""
    yield
    for p in STARTED:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    STARTED.clear()


STARTED: list[subprocess.Popen] = []


def _follow(path, offset: int, once: bool, got: bytearray) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", READER, str(path), str(offset), "once" if once else "follow"],
                         stdout=subprocess.PIPE)
    STARTED.append(p)
    assert p.stdout.readline() == b"CPT-STREAM %d\n" % offset

    def copy():
        while chunk := p.stdout.read1(1 << 16):
            got.extend(chunk)
    t = threading.Thread(target=copy, daemon=True)
    t.start()
    p.copier = t
    return p


def _until(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not pred():
        time.sleep(0.05)
    assert pred()


def test_a_torn_line_is_never_sent_and_the_copy_stays_a_prefix(tmp_path):
    path = tmp_path / "events.jsonl"
    w = EventWriter(path, "s")
    for step in range(1, 6):
        w.emit("metric", step=step, tokens=step, loss=1.0, lr=1e-3, tokens_per_s=1.0)
    w.close()
    with open(path, "ab") as f:
        f.write(b'{"v": 1, "seq": 6, "type": "metric", "ste')  # the trainer killed mid-write
    got = bytearray()
    p = _follow(path, 0, False, got)
    whole = path.read_bytes()
    _until(lambda: bytes(got) == whole[: whole.rfind(b"\n") + 1])
    time.sleep(0.3)
    assert bytes(got) == whole[: whole.rfind(b"\n") + 1]  # the torn line was not sent
    again = EventWriter(path, "s")  # the next attempt truncates it and goes on
    for step in range(4, 9):
        again.emit("metric", step=step, tokens=step, loss=0.5, lr=1e-3, tokens_per_s=1.0)
    again.emit("status", state="done", step=8, total_steps=8)
    again.close()
    _until(lambda: bytes(got) == path.read_bytes())
    p.terminate()
    p.wait(10)
    recs, _ = read_events(path)
    assert [r["seq"] for r in recs] == list(range(1, 12)) and recs[-1]["type"] == "status"
    # a cut connection resumed mid-line (the manager's copy ends inside a line it had half received):
    # `once` completes that line and the rest, and stops at a torn tail
    with open(path, "ab") as f:
        f.write(b'{"torn')
    head = bytearray(path.read_bytes()[:100])
    p = _follow(path, 100, True, head)
    assert p.wait(20) == 0
    p.copier.join(10)
    data = path.read_bytes()
    assert bytes(head) == data[: data.rfind(b"\n") + 1]


def test_a_line_longer_than_one_read_is_sent_whole(tmp_path):
    path = tmp_path / "events.jsonl"
    line = b'{"x": "' + b"a" * (3 << 20) + b'"}\n'
    path.write_bytes(b'{"first": 1}\n' + line + b'{"la')
    got = bytearray()
    p = _follow(path, 0, True, got)
    assert p.wait(30) == 0
    p.copier.join(10)
    assert bytes(got) == b'{"first": 1}\n' + line
