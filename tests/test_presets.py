"""Presets: every shipped preset validates; bad presets exit 2 naming file, YAML path and line,
and write nothing to the database."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpt_tui.paths import list_presets
from tests.demo_run import run_cli

ALL = ["tiny-demo", "finemath-llama3-3b", "vinasmol-eeve-360m", "dolmino-llama31-8b", "ddp-cluster", "ambari-lora"]


def test_all_six_presets_are_shipped():
    assert {p.stem for p in list_presets()} >= set(ALL)  # sets: sorted lists compare lexicographically


@pytest.mark.parametrize("name", ALL)
def test_preset_validates_and_plans(name, cpt_home):
    r = run_cli(["plan", name, "--json"], cpt_home)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["stages"] and all(s["global_batch_size"] > 0 for s in plan["stages"])
    text = run_cli(["plan", name], cpt_home)
    assert text.returncode == 0 and "global batch" in text.stdout


def test_dolmino_plan_carries_seed_proportions(cpt_home):
    plan = json.loads(run_cli(["plan", "dolmino-llama31-8b", "--json"], cpt_home).stdout)
    (stage,) = plan["stages"]
    weights = {s["source"]: s["weight"] for s in stage["mixture"]["sources"]}
    assert weights == {"dclm": 0.472, "flan": 0.166, "pes2o": 0.0585, "wiki": 0.0711,
                       "stackexchange": 0.0245, "math": 0.208}
    assert stage["seq_len"] == 8192 and stage["mixture"]["budget_tokens"] == 50_000_000_000


def test_seed_hyperparameters_are_carried():
    from engine.spec import load_preset
    from cpt_tui.paths import find_preset

    amb = load_preset(find_preset("ambari-lora")).stages[0]
    assert (amb.lora.r, amb.lora.alpha, amb.lora.dropout) == (8, 32, 0.05)
    assert set(amb.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert amb.lora.modules_to_save == ["embed_tokens", "lm_head"]
    assert (amb.zero_stage, amb.precision, amb.seq_len, amb.schedule.lr, amb.schedule.warmup_ratio) == (2, "fp16", 512, 2e-4, 0.05)
    ddp = load_preset(find_preset("ddp-cluster"))
    assert len(ddp.cluster.nodes) == 8 and ddp.cluster.processes_per_node == 4
    assert ddp.stages[0].global_batch_size == 512 and ddp.mixtures == {} and ddp.stages[0].mixture.epochs == 3
    vs = load_preset(find_preset("vinasmol-eeve-360m"))
    assert [s.name for s in vs.stages][:4] == ["eeve-3", "eeve-4", "eeve-6", "eeve-7"]
    assert vs.stages[-1].seq_len == 8192 and vs.stages[0].seq_len == 2048
    assert {s.schedule.lr for s in vs.stages} == {1e-4, 2e-4} and {s.schedule.warmup_steps for s in vs.stages} == {50}
    assert vs.vocabulary.output_init == "mean"
    fm = load_preset(find_preset("finemath-llama3-3b"))
    # weights only, fresh optimizer and schedule: what `start: previous` does (load_* flags act only on resume)
    assert fm.stages[0].start == "previous" and not {"load_optimizer", "load_lr_scheduler"} & fm.stages[0].model_fields_set
    assert fm.mixtures["mix-3plus"].weights == {"fineweb-edu": 0.4, "finemath-3plus": 0.3, "infiwebmath-3plus": 0.3}


GOOD = """\
name: bad
model:
  config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2}
tokenizer:
  train: {sources: [a], vocab_size: 300}
sources:
  a: {path: builtin:stdlib-prose}
stages:
  - name: s1
    mixture: {weights: {a: 1.0}, tokens: 4096}
    seq_len: 32
    global_batch_size: 4
    schedule:
      warmup_steps: 1
"""

BAD = {
    "unknown key": (GOOD.replace("      warmup_steps: 1", "      warmup_steps: 1\n      warmpu: 3"),
                    "stages[0].schedule.warmpu", 15, "unknown key"),
    "wrong type": (GOOD.replace("warmup_steps: 1", "warmup_steps: soon"), "stages[0].schedule.warmup_steps", 14,
                   "integer"),
    "negative weight": (GOOD.replace("{a: 1.0}", "{a: -1.0}"), "stages[0].mixture.weights", 10, ">= 0"),
    "zero weights": (GOOD.replace("{a: 1.0}", "{a: 0.0}"), "stages[0].mixture.weights", 10, "sum to zero"),
    "unknown source": (GOOD.replace("{a: 1.0}", "{b: 1.0}"), "stages[0].mixture.weights.b", 10, "unknown source 'b'"),
    "unparsable": (GOOD.replace("seq_len: 32", "seq_len: [32"), "", None, "not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_preset_exit_2_names_file_path_line(case, cpt_home, tmp_path):
    text, yaml_path, line, words = BAD[case]
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    for args in (["plan", str(f)], ["--run", str(f)]):
        r = run_cli(args, cpt_home)
        assert r.returncode == 2, (case, r.stdout, r.stderr)
        assert str(f) in r.stderr and words in r.stderr, r.stderr
        if yaml_path:
            assert yaml_path + ":" in r.stderr, r.stderr
        if line:
            assert f"line {line}" in r.stderr, r.stderr
        else:
            assert "line " in r.stderr
    assert not Path(cpt_home["CPT_TUI_DB"]).exists()  # nothing written to the database


def test_missing_data_path_at_run(cpt_home, tmp_path):
    f = tmp_path / "missing.yaml"
    f.write_text(GOOD.replace("builtin:stdlib-prose", str(tmp_path / "nope" / "data.jsonl")))
    assert run_cli(["plan", str(f)], cpt_home).returncode == 0  # plan does not need the data
    r = run_cli(["--run", str(f)], cpt_home)
    assert r.returncode == 2
    assert "sources.a.path" in r.stderr and "line 7" in r.stderr and "nope" in r.stderr
    assert not Path(cpt_home["CPT_TUI_DB"]).exists()


def test_unset_env_var_in_path_is_named(cpt_home):
    r = run_cli(["--run", "dolmino-llama31-8b"], {**cpt_home, "CPT_MODELS": "/nonexistent-models"})
    assert r.returncode == 2 and "model.path" in r.stderr and "/nonexistent-models" in r.stderr


def test_unknown_preset_name(cpt_home):
    r = run_cli(["plan", "no-such-preset"], cpt_home)
    assert r.returncode == 2 and "tiny-demo" in r.stderr
