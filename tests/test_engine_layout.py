"""engine/layout.py is the one owner of run-directory names: the plan's paths and the checkpoint a
`start: resume` stage resumes from come from it (complete checkpoints only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine.layout import TRAINER_STATE, RunLayout
from engine.plan import PlanError, stage_config, stage_dir
from engine.schedule import Schedule, warmup_steps
from engine.spec import parse_preset

ROOT = Path(__file__).resolve().parents[1]
PREPARED = {"model_dir": "/m", "tokenizer_dir": "/t", "sources": {}}


def _resume_preset():
    data = yaml.safe_load((ROOT / "presets" / "tiny-demo.yaml").read_text())
    data["stages"][1]["start"] = "resume"
    data["stages"][1]["from"] = "base"
    return parse_preset(yaml.safe_dump(data), Path("tiny-demo.yaml"))


def _checkpoint(run_dir: Path, stage: str, step: int, complete: bool) -> Path:
    p = RunLayout(run_dir).stage(stage).checkpoint(step)
    p.mkdir(parents=True)
    if complete:
        (p / TRAINER_STATE).write_text("{}")
    return p


def test_stage_dir_and_paths_come_from_the_layout(tmp_path):
    preset = _resume_preset()
    lay = RunLayout(tmp_path)
    assert stage_dir(tmp_path, preset.stages[0]) == lay.stage("base").root == tmp_path / "stages" / "base"
    _checkpoint(tmp_path, "base", 48, complete=True)
    cfg = stage_config(preset, 1, tmp_path, PREPARED)
    assert cfg["out_dir"] == str(lay.stage("cpt-code").root)
    assert cfg["model_dir"] == str(lay.stage("base").final)
    assert stage_config(preset, 0, tmp_path, PREPARED)["model_dir"] == "/m"


def test_resume_takes_the_newest_complete_checkpoint(tmp_path):
    preset = _resume_preset()
    good = _checkpoint(tmp_path, "base", 48, complete=True)
    _checkpoint(tmp_path, "base", 96, complete=False)  # killed before trainer_state.json: not a checkpoint
    _checkpoint(tmp_path, "base", 9, complete=True)  # numeric order, not lexical
    assert stage_config(preset, 1, tmp_path, PREPARED)["resume_from"] == str(good)


def test_resume_without_a_complete_checkpoint_is_a_plan_error(tmp_path):
    preset = _resume_preset()
    _checkpoint(tmp_path, "base", 96, complete=False)
    with pytest.raises(PlanError, match="left no checkpoint to resume from"):
        stage_config(preset, 1, tmp_path, PREPARED)


def test_warmup_steps_has_one_definition():
    st = _resume_preset().stages[0]
    assert warmup_steps(st, 100) == warmup_steps(st.schedule, 100) == 10
    ratio = st.schedule.model_copy(update={"warmup_steps": None, "warmup_ratio": 0.05})
    assert warmup_steps(ratio, 101) == 6 and warmup_steps(ratio.model_copy(update={"warmup_ratio": None}), 9) == 0
    assert Schedule(ratio, 101).warmup == 6
