"""The first UI screen lists runs from SQLite (Pilot)."""

from __future__ import annotations

import asyncio

from cpt_tui.ui.app import CptApp
from textual.widgets import DataTable


def test_app_lists_the_demo_run(demo_run):
    async def go():
        app = CptApp(demo_run.db)
        async with app.run_test() as pilot:
            table = app.query_one("#runs", DataTable)
            for _ in range(50):
                await pilot.pause(0.1)
                if table.row_count:
                    break
            assert table.row_count == 1
            row = table.get_row_at(0)
            assert row[0] == demo_run.run_id and row[1] == "done" and row[2] == "tiny-demo"
    asyncio.run(go())


def test_app_without_database_shows_hint(tmp_path):
    async def go():
        app = CptApp(tmp_path / "none.db")
        async with app.run_test() as pilot:
            await pilot.pause(0.3)
            assert "cpt-tui --run tiny-demo" in str(app.query_one("#empty").render())
    asyncio.run(go())
