"""Launch from the UI (Pilot): dry run shows the exact commands; Launch starts a detached supervised
run (supervisor.start_detached) of a small tiny-demo, which completes and shows its curves; a new app
on the same database finds it again."""

from __future__ import annotations

import asyncio
import time

import pytest
from textual.widgets import DataTable, Input

from cpt_tui.ui.app import CptApp
from cpt_tui.ui.plot import Chart

SMALL_DEMO = """\
name: ui-mini-demo
description: tiny-demo, smaller (UI launch test)
seed: 1234
model:
  config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2,
           max_position_embeddings: 128}
tokenizer:
  train: {sources: [prose], vocab_size: 400, max_chars: 200000}
sources:
  prose: {path: "builtin:stdlib-prose", val_tokens: 1024, max_tokens: 40000}
stages:
  - name: base
    kind: base
    mixture: {weights: {prose: 1.0}, tokens: 6144}
    seq_len: 64
    micro_batch_size: 8
    global_batch_size: 8
    precision: fp32
    schedule: {name: cosine, lr: 3.0e-3, warmup_steps: 2}
    eval: {every_steps: 6, max_blocks: 4}
    checkpoint: {every_steps: 6, keep_last: 1}
    log_every: 2
"""


async def until(pilot, cond, timeout):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await pilot.pause(0.2)


@pytest.mark.timeout(400)
def test_launch_from_ui_runs_to_completion_with_curves(tmp_path, shared_cache, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("CPT_TUI_HOME", str(home))
    monkeypatch.setenv("CPT_TUI_CACHE", str(shared_cache))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    db = home / "cpt-tui.db"
    preset = tmp_path / "ui-mini-demo.yaml"
    preset.write_text(SMALL_DEMO)

    async def launch():
        app = CptApp(db, keymap={})
        async with app.run_test(size=(160, 50)) as pilot:
            await pilot.press("f4")
            scr = app.screen
            scr.query_one("#launch-preset", Input).value = str(preset)
            await pilot.click("#dry-run")
            await until(pilot, lambda: "accelerate.commands.launch" in str(scr.query_one("#commands").render()), 60)
            # the trainer picks its device on the node (issue 20): the launcher sends no --cpu of its own
            assert "-m engine.train" in str(scr.query_one("#commands").render()) and \
                "--cpu" not in str(scr.query_one("#commands").render())
            await pilot.click("#launch")
            await until(pilot, lambda: scr.launched is not None, 120)
            run_id = scr.launched
            await until(pilot, lambda: type(app.screen).__name__ == "RunDetailScreen", 10)
            detail = app.screen
            await until(pilot, lambda: detail.data is not None and detail.data.run["status"] in ("done", "failed"), 300)
            assert detail.data.run["status"] == "done", detail.data.run["error"]
            await until(pilot, lambda: detail.query_one("#chart-loss", Chart).labels, 10)
            assert detail.query_one("#chart-val", Chart).labels == ["prose"]
            return run_id

    run_id = asyncio.run(launch())

    async def reopen():  # the UI was closed: a new one finds the run
        app = CptApp(db, keymap={})
        async with app.run_test(size=(160, 50)) as pilot:
            await until(pilot, lambda: getattr(app.screen, "polls", 0), 10)
            table = app.screen.query_one("#runs", DataTable)
            assert table.get_row_at(0)[0] == run_id and str(table.get_row_at(0)[1]) == "done"
    asyncio.run(reopen())
