"""Mixture builder and stage-plan editor (Pilot): a weight edit updates tokens / epochs and the saved
preset; a stage added from a template gives a preset that validates; fields validate as you type."""

from __future__ import annotations

import asyncio
import shutil

import yaml
from textual.widgets import Input, Select

from cpt_tui.paths import REPO_PRESETS
from cpt_tui.ui.app import CptApp
from engine.spec import load_preset
from tests.pilot import until


def test_mixture_weight_edit_updates_table_and_saved_preset(tmp_path):
    preset = tmp_path / "demo.yaml"
    shutil.copy(REPO_PRESETS / "tiny-demo.yaml", preset)
    out = tmp_path / "edited.yaml"

    async def go():
        app = CptApp(tmp_path / "none.db", preset=str(preset), keymap={})
        async with app.run_test(size=(160, 50)) as pilot:
            await pilot.press("f2")
            scr = app.screen
            assert type(scr).__name__ == "MixtureScreen"
            scr.query_one("#mix-target", Select).value = "stages.1.mixture"  # cpt-code: code .75, prose .25
            await until(pilot, lambda: scr.tokens and scr.query_one("#mix-table").row_count == 2)
            before = scr.row("prose")
            assert before[2] == "25.0%" and before[3] == "49.2k"  # 0.25 × 196,608 tokens
            prose_input = [w for w in scr.query(".weight") if w.value == "0.25"][0]
            prose_input.value = "0.75"
            await pilot.pause(0.1)
            after = scr.row("prose")
            assert after[2] == "50.0%" and after[3] == "98.3k"
            assert float(after[5]) > float(before[5])  # more epochs over the same prose
            scr.query_one("#mix-save-path", Input).value = str(out)
            await pilot.press("ctrl+s")
            await pilot.pause(0.2)
    asyncio.run(go())
    saved = load_preset(out)  # validates
    assert saved.stages[1].mixture.weights == {"code": 0.75, "prose": 0.75}
    assert yaml.safe_load(out.read_text())["stages"][1]["mixture"]["tokens"] == 196608
    # the user's file survives the edit: every comment line kept, only the edited value differs
    src, got = preset.read_text().splitlines(), out.read_text().splitlines()
    assert [line for line in got if line.lstrip().startswith("#")] == [
        line for line in src if line.lstrip().startswith("#")]
    changed = [(a, b) for a, b in zip(src, got) if a != b]
    assert len(src) == len(got) and len(changed) == 1 and "0.75" in changed[0][1], changed


def test_stage_from_template_validates_and_fields_check_as_you_type(tmp_path):
    preset = tmp_path / "demo.yaml"
    shutil.copy(REPO_PRESETS / "tiny-demo.yaml", preset)
    out = tmp_path / "planned.yaml"

    async def go():
        app = CptApp(tmp_path / "none.db", preset=str(preset), keymap={})
        async with app.run_test(size=(180, 60)) as pilot:
            await pilot.press("f3")
            scr = app.screen
            assert type(scr).__name__ == "PlanScreen"
            assert scr.query_one("#stages").row_count == 2
            scr.query_one("#stages").focus()
            await pilot.press("down")  # select stage 2, the new one goes after it
            await until(pilot, lambda: scr.selected == 1)
            scr.query_one("#template", Select).value = "Annealing"
            await pilot.press("ctrl+a")
            assert scr.query_one("#stages").row_count == 3 and scr.selected == 2
            assert scr.query_one("#f-name", Input).value == "anneal"
            assert "anneal" in str(scr.query_one("#plan-summary").render())
            # a bad value shows the schema's message under the field, and blocks saving
            scr.query_one("#f-seq_len", Input).value = "-1"
            await pilot.pause(0.1)
            assert "greater than 0" in str(scr.query_one("#err-f-seq_len").render())
            scr.query_one("#f-seq_len", Input).value = "128"
            await pilot.pause(0.1)
            assert str(scr.query_one("#err-f-seq_len").render()).strip() == ""
            # reorder: move it up, then back down
            await pilot.press("ctrl+up")
            assert [s["name"] for s in app.draft.stages] == ["base", "anneal", "cpt-code"]
            await pilot.press("ctrl+down")
            scr.query_one("#plan-save-path", Input).value = str(out)
            await pilot.press("ctrl+s")
            await pilot.pause(0.2)
    asyncio.run(go())
    saved = load_preset(out)
    assert [s.name for s in saved.stages] == ["base", "cpt-code", "anneal"]
    assert saved.stages[2].kind == "anneal" and saved.stages[2].schedule.name == "linear"


def test_every_template_validates(tmp_path):
    from cpt_tui.ui.draft import TEMPLATES, Draft

    d = Draft.load(REPO_PRESETS / "tiny-vocab-demo.yaml")  # EEVE templates train `new` rows: a vocabulary block
    n0 = len(d.stages)
    for t in TEMPLATES:
        d.add_stage(t)
    preset, problems = d.validate()
    assert problems == [] and [s.kind for s in preset.stages][n0:] == [
        "eeve", "eeve", "eeve", "eeve", "cpt", "anneal", "context_extension", "lora", "relora"]
