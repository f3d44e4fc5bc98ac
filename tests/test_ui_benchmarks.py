"""The forgetting table in the UI: the run detail's Benchmarks tab and compare's side-by-side tables, on
the deterministic sample database (cpt_tui/ui/sample_db.py: benchmark rows of the done and the live run).
Update the snapshots after an intended change with `pytest tests/test_ui_benchmarks.py --snapshot-update`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from textual.widgets import DataTable, TabbedContent

from cpt_tui.ui import sample_db
from cpt_tui.ui.app import CptApp

RUNS_ROOT = Path("/tmp/cpt-tui-snapshots/runs")
SIZE = (150, 42)


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    db = tmp_path / "cpt-tui.db"
    sample_db.build(db, RUNS_ROOT)
    yield CptApp(db, keymap={})
    monkeypatch.delenv("TZ")
    time.tzset()


async def _open_bench_tab(pilot):
    for _ in range(200):
        if type(pilot.app.screen).__name__ == "RunsScreen":
            break
        await pilot.pause(0.05)
    pilot.app.open_run(sample_db.DONE)
    for _ in range(200):
        if getattr(pilot.app.screen, "data", None) is not None:
            break
        await pilot.pause(0.05)
    pilot.app.screen.query_one("#tabs", TabbedContent).active = "tab-bench"
    await pilot.pause(0.3)


def _cells(table: DataTable) -> list[list[str]]:
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def test_detail_forgetting_table_cells(app):
    asyncio.run(_check_cells(app))


async def _check_cells(app):
    async with app.run_test(size=SIZE) as pilot:
        await _open_bench_tab(pilot)
        table = pilot.app.screen.query_one("#forgetting", DataTable)
        assert [str(c.label) for c in table.ordered_columns] == ["task", "metric", "base-model", "base", "cpt-code"]
        rows = {(r[0], r[1]): r[2:] for r in _cells(table)}
        assert rows[("cpt_mc_prose", "acc")] == ["0.2500", "0.2850 (+0.0350)", "0.2700 (+0.0200)"]
        assert rows[("cpt_ppl_code", "bits_per_byte")][2] == "2.6572 (-8.3628)"
        assert rows[("hellaswag", "")] == ["-", "-", "FAILED"]
        assert ("val:code", "loss") in rows and rows[("val:code", "loss")][0] == "-"
        # colour: lower bits per byte is better (green), a failed task red
        row = table.get_row_at(list(rows).index(("cpt_ppl_code", "bits_per_byte")))
        assert row[4].style == "green"


def test_snapshot_detail_benchmarks(app, snap_compare):
    assert snap_compare(app, terminal_size=SIZE, run_before=_open_bench_tab)


def test_snapshot_compare_benchmarks_side_by_side(app, snap_compare):
    async def before(pilot):
        for _ in range(200):
            if type(pilot.app.screen).__name__ == "RunsScreen":
                break
            await pilot.pause(0.05)
        pilot.app.compare([sample_db.DONE, sample_db.LIVE])
        for _ in range(200):
            found = pilot.app.screen.query("#cmp-forgetting-1") if type(pilot.app.screen).__name__ == \
                "CompareScreen" else []
            if found and found.first().row_count:
                break
            await pilot.pause(0.05)
        await pilot.pause(0.3)
    assert snap_compare(app, terminal_size=(150, 60), run_before=before)
