"""The Events tab shows engine events as readable text: a real event log (written by the engine's
EventWriter, ingested through Store.ingest the way the supervisor reads it, raw lines included) and
supervisor-style add_event rows, in a snapshot of the run detail's Events tab."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from textual.widgets import TabbedContent

from cpt_tui.store import Store
from cpt_tui.ui.app import CptApp
from engine.events import EventWriter

RUN_ID = "20250104-000000-tiny-demo-e1e2"
RUN_DIR = Path("/tmp/cpt-tui-snapshots/runs") / RUN_ID  # shown in the detail title: a fixed path
T0 = 1735948800.0  # 2025-01-04 00:00 UTC
SIZE = (150, 42)


def build(db: Path, tmp: Path, monkeypatch) -> None:
    clock = itertools.count(0)
    fake = SimpleNamespace(time=lambda: T0 + next(clock))  # fixed, increasing timestamps
    with monkeypatch.context() as m:  # only while the database is written (Textual needs the real clock)
        m.setattr("engine.events.time", fake)
        m.setattr("cpt_tui.store.time", fake)
        store = Store(db)
        plan = {"stages": [{"index": 0, "name": "base", "kind": "cpt", "steps": 8, "tokens": 8 * 4096}]}
        store.create_run(RUN_ID, "tiny-demo", "presets/tiny-demo.yaml", str(RUN_DIR), plan, "sample")
        store.add_event(RUN_ID, "@run", "status", state="running", pid=4242)
        store.add_event(RUN_ID, "@run", "stage_started", stage_name="base", attempt=1)
        events = tmp / "events.jsonl"
        w = EventWriter(events, "base")
        w.emit("status", state="starting", world_size=1)
        w.emit("status", state="running", step=0, total_steps=8, world_size=1, grad_accum=1, loss="fused")
        for step in (4, 8):
            w.emit("metric", step=step, tokens=step * 4096, loss=3.0 - step / 10, lr=1e-3, grad_norm=0.5,
                   tokens_per_s=20000.0, total_steps=8)
            w.emit("eval", step=step, tokens=step * 4096, domain="prose", loss=3.1 - step / 10, blocks=4)
        w.emit("warning", message="loss spike at step 6", kind="loss_spike", step=6, loss=3.4, mean=2.7)
        w.emit("checkpoint", step=8, path=str(RUN_DIR / "stages/base/checkpoints/step-8"), tokens=8 * 4096)
        w.emit("status", state="done", step=8, total_steps=8, tokens=8 * 4096)
        w.close()
        raw = [line for line in events.read_text().splitlines() if line]
        store.ingest(RUN_ID, [json.loads(line) for line in raw], raw=raw, stage_idx=0, offset=events.stat().st_size)
        store.update_stage(RUN_ID, 0, status="done", started=T0, finished=T0 + 20)
        store.update_run(RUN_ID, status="done", started=T0, finished=T0 + 20, current_stage=0)
        store.add_event(RUN_ID, "@run", "status", state="done")
        store.close()


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    db = tmp_path / "cpt-tui.db"
    build(db, tmp_path, monkeypatch)
    yield CptApp(db, keymap={})
    monkeypatch.delenv("TZ")
    time.tzset()


def test_events_are_stored_without_their_key_fields(tmp_path, monkeypatch):
    db = tmp_path / "cpt-tui.db"
    build(db, tmp_path, monkeypatch)
    with Store(db, readonly=True) as s:
        evs = s.events(RUN_ID, skip_types=("metric",))
    assert all(not {"v", "seq", "ts", "type", "stage"} & set(e.data) for e in evs)
    assert [e.data.get("state") for e in evs if e.type == "status"] == ["running", "starting", "running", "done",
                                                                        "done"]


def test_snapshot_events_tab(app, snap_compare):
    async def before(pilot):
        pilot.app.open_run(RUN_ID)
        for _ in range(200):
            if type(pilot.app.screen).__name__ == "RunDetailScreen" and getattr(pilot.app.screen, "data", None):
                break
            await pilot.pause(0.05)
        pilot.app.screen.query_one("#tabs", TabbedContent).active = "tab-events"
        await pilot.pause(0.5)
    assert snap_compare(app, terminal_size=SIZE, run_before=before)
