"""Runs home screen and run detail on a fixed sample database (Pilot): listing, sort, filter,
navigation to every screen, delete with confirmation, the detail's curves and axis switch."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from textual.widgets import DataTable

from cpt_tui.ui import sample_db
from cpt_tui.ui.app import CptApp
from cpt_tui.ui.plot import Chart
from tests.pilot import until


@pytest.fixture
def sample(tmp_path) -> Path:
    db = tmp_path / "cpt-tui.db"
    sample_db.build(db)
    return db


def test_runs_table_sort_filter_and_navigation(sample):
    async def go():
        app = CptApp(sample, keymap={})
        async with app.run_test(size=(180, 45)) as pilot:
            await until(pilot, lambda: type(app.screen).__name__ == "RunsScreen" and app.screen.polls)
            runs = app.screen
            table = runs.query_one("#runs", DataTable)
            assert table.row_count == 3
            ids = [table.get_row_at(i)[0] for i in range(3)]
            assert ids == [sample_db.FAILED, sample_db.LIVE, sample_db.DONE]  # newest first
            live = table.get_row(sample_db.LIVE)
            assert str(live[1]) == "running" and live[3] == "2/2" and "75%" in live[4]
            # filter
            await pilot.press("slash", *"ddp", "enter")
            assert table.row_count == 1 and table.get_row_at(0)[0] == sample_db.FAILED
            await pilot.press("escape")
            assert table.row_count == 3
            # sort by clicking a header (status: an order unlike the default), then again to reverse
            status_x = sum(c.get_render_width(table) for c in list(table.columns.values())[:1]) + 2
            await pilot.click("#runs", offset=(status_x, 0))
            await pilot.pause(0.1)
            assert [table.get_row_at(i)[0] for i in range(3)] == [sample_db.DONE, sample_db.FAILED, sample_db.LIVE]
            await pilot.click("#runs", offset=(status_x, 0))
            await pilot.pause(0.1)
            assert [table.get_row_at(i)[0] for i in range(3)] == [sample_db.LIVE, sample_db.FAILED, sample_db.DONE]
            assert str(list(table.columns.values())[1].label).endswith("▼")
            await pilot.click("#runs", offset=(50, 0))  # preset ascending (stable: ties keep the status order)
            await pilot.pause(0.1)
            assert [table.get_row_at(i)[2] for i in range(3)] == ["ddp-cluster", "tiny-demo", "tiny-demo"]
            assert [table.get_row_at(i)[0] for i in range(3)] == [sample_db.FAILED, sample_db.LIVE, sample_db.DONE]
            # open the done run (cursor → row 3, enter) and switch the x axis
            await pilot.press("down", "down")
            await pilot.press("enter")
            await until(pilot, lambda: type(app.screen).__name__ == "RunDetailScreen" and app.screen.data)
            detail = app.screen
            loss = detail.query_one("#chart-loss", Chart)
            assert loss.labels == ["loss", "EMA 0.1"] and len(loss.markers) == 1  # one stage boundary
            assert detail.query_one("#chart-val", Chart).labels == ["code", "prose"]
            assert loss.markers == [96]
            await pilot.press("x")
            assert loss.markers == [96 * sample_db.TOK_PER_STEP]
            assert "cpt-code" in str(detail.query_one("#timeline").render())
            await pilot.press("escape")
            assert type(app.screen).__name__ == "RunsScreen"
            # every screen by its key (F-keys work even where an input has focus)
            for key, name in (("f2", "MixtureScreen"), ("f3", "PlanScreen"), ("f4", "LaunchScreen"),
                              ("f5", "NodesScreen"), ("f1", "RunsScreen")):
                await pilot.press(key)
                await pilot.pause(0.1)
                assert type(app.screen).__name__ == name
    asyncio.run(go())


def test_delete_asks_and_keeps_checkpoints(sample):
    run_dir = sample.parent / "runs" / sample_db.DONE
    ckpt = run_dir / "stages" / "base" / "checkpoints" / "step-48"
    ckpt.mkdir(parents=True)

    async def go():
        app = CptApp(sample, keymap={})
        async with app.run_test(size=(180, 45)) as pilot:
            await until(pilot, lambda: type(app.screen).__name__ == "RunsScreen" and app.screen.polls)
            table = app.screen.query_one("#runs", DataTable)
            await pilot.press("down", "down", "d")
            await until(pilot, lambda: type(app.screen).__name__ == "ConfirmDelete")
            await pilot.click("#cancel")
            await pilot.pause(0.3)
            assert table.row_count == 3
            await pilot.press("d")
            await until(pilot, lambda: type(app.screen).__name__ == "ConfirmDelete")
            await pilot.click("#confirm")
            await until(pilot, lambda: table.row_count == 2)
            assert sample_db.DONE not in [table.get_row_at(i)[0] for i in range(2)]
    before = _rows_per_table(sample, sample_db.DONE)
    assert all(before.values()), before  # the sample has rows of the run in every run table
    asyncio.run(go())
    assert ckpt.is_dir()  # the box was not ticked: checkpoints untouched
    assert _rows_per_table(sample, sample_db.DONE) == {t: 0 for t in before}
    others = _rows_per_table(sample, sample_db.LIVE)
    assert others["metrics"] > 0 and others["runs"] == 1  # only that run's rows went


def _rows_per_table(db: Path, run_id: str) -> dict:
    """Rows of `run_id` in the runs table and in every table keyed on run_id."""
    import sqlite3

    from cpt_tui.store import RUN_TABLES

    with sqlite3.connect(db) as c:
        out = {"runs": c.execute("SELECT count(*) FROM runs WHERE id = ?", [run_id]).fetchone()[0]}
        for t in sorted(set(RUN_TABLES) | {r[0] for r in c.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND sql LIKE '%run_id%'")}):
            out[t] = c.execute(f"SELECT count(*) FROM {t} WHERE run_id = ?", [run_id]).fetchone()[0]
    return out


def test_app_without_database_shows_hint(tmp_path):
    async def go():
        app = CptApp(tmp_path / "none.db", keymap={})
        async with app.run_test() as pilot:
            await pilot.pause(0.5)
            assert "cpt-tui --run tiny-demo" in str(app.screen.query_one("#empty").render())
    asyncio.run(go())


def test_keymap_remaps_a_binding_by_id(sample):
    async def go():
        app = CptApp(sample, keymap={"runs.filter": "f"})
        async with app.run_test(size=(180, 45)) as pilot:
            await until(pilot, lambda: type(app.screen).__name__ == "RunsScreen" and app.screen.polls)
            await pilot.press("f")
            assert app.focused.id == "filter"
    asyncio.run(go())


def test_palette_lists_runs_and_presets(sample):
    from cpt_tui.ui.palette import CptCommands

    async def go():
        app = CptApp(sample, keymap={})
        async with app.run_test(size=(180, 45)) as pilot:
            await pilot.pause(0.3)
            provider = CptCommands(app.screen)
            await provider.startup()
            texts = [t for t, _, _ in provider._commands()]
            assert f"Open run {sample_db.DONE}" in texts
            assert f"Stop run {sample_db.LIVE}" in texts and f"Stop run {sample_db.DONE}" not in texts
            assert "Launch preset tiny-demo" in texts
            assert any(t.startswith("Compare ") for t in texts)
    asyncio.run(go())


def test_detail_reuse_draws_with_data_and_hidden_screens_rest(sample):
    """Opening runs one after the other reuses the detail screen, pushed with the new run's data; the
    charts redraw on data, focus (axis colour) and resize; the runs list under it does not poll."""
    async def go():
        app = CptApp(sample, keymap={})
        async with app.run_test(size=(180, 45)) as pilot:
            await until(pilot, lambda: type(app.screen).__name__ == "RunsScreen" and app.screen.polls)
            runs = app.screen
            app.open_run(sample_db.DONE)
            await until(pilot, lambda: type(app.screen).__name__ == "RunDetailScreen" and app.screen.data)
            detail = app.screen
            loss = detail.query_one("#chart-loss", Chart)
            assert detail.query_one("#chart-val", Chart).labels == ["code", "prose"]
            polls = runs.polls
            await pilot.pause(2.5)  # more than a poll period
            assert runs.polls == polls  # hidden under the detail: no polling, no repaint
            app.pop_screen()
            await pilot.pause(0.2)
            app.open_run(sample_db.FAILED)
            # normally pushed with its data (read first, up to App.OPEN_WAIT_S)
            await until(pilot, lambda: app.screen is detail and detail.data
                        and detail.data.run["id"] == sample_db.FAILED)
            assert sample_db.FAILED in str(detail.query_one("#run-title").render())
            assert loss.labels == ["loss", "EMA 0.1"]
            drawn = []
            orig = loss._render_plot
            loss._render_plot = lambda: (drawn.append(1), orig())
            loss.focus()
            await pilot.pause(0.2)
            assert drawn  # the axis takes the focus colour
            drawn.clear()
            await pilot.resize_terminal(150, 40)
            await pilot.pause(0.3)
            assert drawn and loss.query_one("#plot").size.width < 80
            await pilot.press("escape")
            await until(pilot, lambda: app.screen is runs)
    asyncio.run(go())


def test_delete_with_directory_and_refusal_for_a_live_run(sample):
    """Ticking the box removes the run directory (rmtree: data loss, so only that run's); a run whose
    supervisor lives is refused, rows and directory untouched."""
    import socket
    import subprocess
    import sys

    from cpt_tui.store import Store

    root = sample.parent / "runs"
    (root / sample_db.DONE / "stages" / "base" / "checkpoints" / "step-48").mkdir(parents=True)
    (root / sample_db.LIVE / "stages" / "base" / "checkpoints" / "step-8").mkdir(parents=True)
    # A process that looks like the live run's supervisor (its command line names the module and the run).
    sup = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "cpt_tui.supervisor", sample_db.LIVE])
    try:
        with Store(sample) as store:
            store.update_run(sample_db.LIVE, pid=sup.pid, host=socket.gethostname())
        live_rows = _rows_per_table(sample, sample_db.LIVE)

        async def go():
            app = CptApp(sample, keymap={})
            async with app.run_test(size=(180, 45)) as pilot:
                await until(pilot, lambda: type(app.screen).__name__ == "RunsScreen" and app.screen.polls)
                runs = app.screen
                table = runs.query_one("#runs", DataTable)
                for rid in (sample_db.LIVE, sample_db.DONE):
                    table.move_cursor(row=[table.get_row_at(i)[0] for i in range(table.row_count)].index(rid))
                    await pilot.pause(0.1)
                    assert runs.selected_id() == rid
                    await pilot.press("d")
                    await until(pilot, lambda: type(app.screen).__name__ == "ConfirmDelete")
                    await pilot.click("#with-files")
                    await pilot.pause(0.1)
                    assert app.screen.query_one("#with-files").value is True
                    await pilot.click("#confirm")
                    await until(pilot, lambda: type(app.screen).__name__ == "RunsScreen")
                    await app.workers.wait_for_complete()
                    await pilot.pause(0.3)
                    if rid == sample_db.LIVE:  # refused
                        assert table.row_count == 3
                await until(pilot, lambda: table.row_count == 2)
                assert sample_db.DONE not in [table.get_row_at(i)[0] for i in range(2)]
        asyncio.run(go())
        assert sup.poll() is None  # the supervisor was not touched
        assert _rows_per_table(sample, sample_db.LIVE) == live_rows
        assert (root / sample_db.LIVE / "stages" / "base" / "checkpoints" / "step-8").is_dir()
        assert not (root / sample_db.DONE).exists()  # the box was ticked: the directory is gone
        assert (root / sample_db.FAILED).is_dir()
        assert set(_rows_per_table(sample, sample_db.DONE).values()) == {0}
    finally:
        sup.kill()
        sup.wait()
