"""Snapshots (pytest-textual-snapshot) of the main screens on fixed data: a sample database built by
the test with deterministic rows (not the live demo), UTC times, cursor blink off.
Update after an intended change with `pytest tests/test_ui_snapshots.py --snapshot-update`."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from textual.widgets import Input

from cpt_tui.ui import sample_db
from cpt_tui.ui.app import CptApp

RUNS_ROOT = Path("/tmp/cpt-tui-snapshots/runs")  # shown in the detail title: a fixed path
SIZE = (150, 42)


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    monkeypatch.setattr("cpt_tui.ui.screens.mixture.estimate_tokens", lambda src: 1_000_000)
    db = tmp_path / "cpt-tui.db"
    sample_db.build(db, RUNS_ROOT)
    yield CptApp(db, keymap={})
    monkeypatch.delenv("TZ")
    time.tzset()


async def settle(pilot, screen_name: str) -> None:
    app = pilot.app
    for _ in range(200):
        if type(app.screen).__name__ == screen_name and getattr(app.screen, "polls", 1):
            break
        await pilot.pause(0.05)
    for inp in app.screen.query(Input):
        inp.cursor_blink = False
        if inp.value.startswith("/"):  # absolute paths differ between checkouts
            inp.value = "presets/" + Path(inp.value).name
    await pilot.pause(0.3)


def test_snapshot_runs(app, snap_compare):
    async def before(pilot):
        await settle(pilot, "RunsScreen")
    assert snap_compare(app, terminal_size=SIZE, run_before=before)


def test_snapshot_run_detail(app, snap_compare):
    async def before(pilot):
        await settle(pilot, "RunsScreen")
        pilot.app.open_run(sample_db.DONE)
        for _ in range(200):
            if getattr(pilot.app.screen, "data", None) is not None:
                break
            await pilot.pause(0.05)
        await settle(pilot, "RunDetailScreen")
    assert snap_compare(app, terminal_size=SIZE, run_before=before)


def test_snapshot_mixture_builder(app, snap_compare):
    async def before(pilot):
        await pilot.press("f2")
        await settle(pilot, "MixtureScreen")
        pilot.app.screen.query_one("#mix-target").value = "stages.1.mixture"
        await pilot.pause(0.3)
    assert snap_compare(app, terminal_size=SIZE, run_before=before)


def test_snapshot_stage_plan(app, snap_compare):
    async def before(pilot):
        await pilot.press("f3")
        await settle(pilot, "PlanScreen")
    assert snap_compare(app, terminal_size=SIZE, run_before=before)
