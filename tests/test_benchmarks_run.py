"""Benchmarks and forgetting (issue 12, the integration half): the preset block, plan-time checks,
the in-run evaluations of the tiny demo (base-model + each stage), `cpt-tui eval` after the fact
cross-checked against the `lm_eval` CLI, a missing dataset failing its task only, the store rows,
`show --json`'s `benchmarks`, and the forgetting table."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cpt_tui.benchmarks import forgetting_table, format_table
from cpt_tui.store import Store
from engine.plan import PlanError, resolve
from engine.spec import PresetError, parse_preset
from tests.demo_run import run_cli

ROOT = Path(__file__).resolve().parents[1]

PRESET = """\
name: bench-tiny
model:
  config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2}
tokenizer:
  train: {sources: [prose], vocab_size: 300}
sources:
  prose: {path: builtin:stdlib-prose, val_tokens: VAL}
stages:
  - name: s1
    mixture: {weights: {prose: 1.0}, tokens: 8192}
    seq_len: 32
    global_batch_size: 8
    eval: {every_steps: 10, max_blocks: all}
benchmarks:
  tasks: [cpt_mc_prose, TASK]
  include_path: builtin:cpt-local
  limit: 8
"""


def _preset(val=1024, task="cpt_ppl_code") -> str:
    return PRESET.replace("VAL", str(val)).replace("TASK", task)


# --------------------------------------------------------------------------- spec and plan


def test_benchmarks_block_and_max_blocks_all():
    p = parse_preset(_preset())
    assert p.benchmarks.tasks == ["cpt_mc_prose", "cpt_ppl_code"] and p.benchmarks.stage_names(p) == ["s1"]
    assert p.stages[0].eval.max_blocks == "all" and p.stages[0].eval.block_limit == sys.maxsize
    plan = resolve(p)
    assert plan["validation"] == [{"domain": "prose", "sources": ["prose"], "val_tokens": 1024, "val_fraction": None}]
    assert plan["benchmarks"]["stages"] == ["s1"] and plan["benchmarks"]["reference"] is True
    with pytest.raises(PresetError) as e:
        parse_preset(_preset().replace("  limit: 8\n", "  stages: [s1, nope]\n"))
    assert "benchmarks.stages[1]" in str(e.value) and "unknown stage 'nope'" in str(e.value)


def test_eval_block_without_validation_data_is_refused(tmp_path, cpt_home):
    with pytest.raises(PlanError) as e:
        resolve(parse_preset(_preset(val=0)))
    assert e.value.yaml_path == "stages[0].eval"
    f = tmp_path / "noval.yaml"
    f.write_text(_preset(val=0))
    r = run_cli(["plan", str(f)], cpt_home)
    assert r.returncode == 2, r.stderr
    assert f"{f}, line 13, stages[0].eval" in r.stderr and "no source holds validation data out" in r.stderr
    # held-out tokens less than one block of the stage's seq_len count as none
    f.write_text(_preset(val=16))
    r = run_cli(["plan", str(f)], cpt_home)
    assert r.returncode == 2 and "less than one block of seq_len 32" in r.stderr
    # a stage without an eval block and no validation data is fine
    f.write_text(_preset(val=0).replace("    eval: {every_steps: 10, max_blocks: all}\n", ""))
    assert run_cli(["plan", str(f)], cpt_home).returncode == 0


def test_plan_lists_validation_tokens_and_benchmarks(tmp_path, cpt_home):
    f = tmp_path / "ok.yaml"
    f.write_text(_preset())
    r = run_cli(["plan", str(f)], cpt_home)
    assert r.returncode == 0, r.stderr
    assert "prose                    1,024 tokens  (from prose)" in r.stdout
    assert "benchmarks (lm-eval): cpt_mc_prose, cpt_ppl_code" in r.stdout and "base-model, s1" in r.stdout


def test_unknown_task_exits_2_at_plan_with_its_line(tmp_path, cpt_home):
    pytest.importorskip("lm_eval")
    f = tmp_path / "unknown.yaml"
    f.write_text(_preset(task="no_such_task_xyz"))
    r = run_cli(["plan", str(f)], cpt_home, timeout=600)  # lm-eval's registry, in a subprocess
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{f}, line 15, benchmarks.tasks[1]: unknown lm-eval task 'no_such_task_xyz'" in r.stderr


# --------------------------------------------------------------------------- the forgetting table


class _R(dict):
    __getattr__ = dict.get


def test_forgetting_table_deltas_and_directions():
    rows = [_R(stage=s, task=t, metric=m, value=v, status="ok", higher_is_better=h, limit=None)
            for s, t, m, v, h in [("base-model", "mc", "acc", 0.25, True), ("s1", "mc", "acc", 0.30, True),
                                  ("s2", "mc", "acc", 0.20, True), ("base-model", "ppl", "bits_per_byte", 3.0, False),
                                  ("s1", "ppl", "bits_per_byte", 2.0, False)]]
    rows.append(_R(stage="s2", task="ppl", metric="", status="failed", reason="FileNotFoundError: x.jsonl"))
    evals = [{"stage": "s1", "domain": "prose", "loss": 3.0}, {"stage": "s1", "domain": "prose", "loss": 2.5},
             {"stage": "s2", "domain": "prose", "loss": 2.7}]
    t = forgetting_table(rows, ["s1", "s2"], evals)
    assert t.columns == ["base-model", "s1", "s2"]
    assert t.rows == [("mc", "acc"), ("ppl", "bits_per_byte"), ("val:prose", "loss")]
    c = t.cells
    assert c[(0, 0)].delta is None and c[(0, 1)].delta == pytest.approx(0.05) and c[(0, 1)].better is True
    assert c[(0, 2)].better is False  # accuracy down: worse
    assert c[(1, 1)].delta == -1.0 and c[(1, 1)].better is True  # bits per byte down: better
    assert c[(1, 2)].failed.startswith("FileNotFoundError")
    # validation: no base-model value, so the first stage is the reference; the last loss of a stage
    assert (0, 2) in c and (2, 0) not in c and c[(2, 1)].value == 2.5 and c[(2, 2)].delta == pytest.approx(0.2)
    assert c[(2, 2)].better is False
    text = format_table(t)
    assert "0.3000 (+0.0500)" in text and "FAILED" in text and "ppl on s2 FAILED: FileNotFoundError" in text


def test_store_benchmark_rows_replace_per_task(tmp_path):
    s = Store(tmp_path / "db.sqlite")
    s.record_benchmarks("r", "s1", [{"task": "a", "metric": "acc", "value": 0.5, "higher_is_better": True,
                                     "status": "ok", "limit": 8},
                                    {"task": "b", "status": "failed", "reason": "boom"}])
    s.record_benchmarks("r", "s1", [{"task": "a", "metric": "acc", "value": 0.6, "status": "ok"}])
    rows = s.benchmarks("r")
    assert [(r.task, r.metric, r.value, r.status) for r in rows] == [("b", "", None, "failed"), ("a", "acc", 0.6, "ok")]
    s.delete_run("r")
    assert s.benchmarks("r") == []


# --------------------------------------------------------------------------- the tiny demo


def _show(demo, db=None) -> dict:
    args = ["show", demo.run_id, "--json"] + (["--db", str(db)] if db else [])
    r = run_cli(args, demo.env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_demo_records_base_model_and_stage_benchmarks(demo_run):
    assert demo_run.result.returncode == 0, demo_run.result.stdout[-3000:] + demo_run.result.stderr[-3000:]
    doc = _show(demo_run)
    bench = doc["benchmarks"]
    assert {b["stage"] for b in bench} == {"base-model", "base", "cpt-code"}
    for stage in ("base-model", "base", "cpt-code"):
        got = {(b["task"], b["metric"]) for b in bench if b["stage"] == stage}
        assert got >= {("cpt_mc_prose", "acc"), ("cpt_ppl_code", "bits_per_byte"), ("cpt_ppl_prose", "bits_per_byte")}
    for b in bench:
        assert set(b) >= {"stage", "task", "metric", "value", "stderr"} and b["status"] == "ok"
        assert isinstance(b["value"], float) and b["limit"] == 40
    assert doc["run"]["status"] == "done"
    # the table in `show`
    r = run_cli(["show", demo_run.run_id], demo_run.env)
    assert "benchmarks and forgetting" in r.stdout and "cpt_ppl_code" in r.stdout and "val:prose" in r.stdout
    head = next(line for line in r.stdout.splitlines() if line.startswith("task"))
    assert head.split()[2:] == ["base-model", "base", "cpt-code"]
    print(f"\ntiny demo with benchmarks: {demo_run.seconds:.0f}s wall")


def test_cpt_tui_eval_equals_lm_eval_cli_and_missing_dataset_fails_that_task(demo_run, tmp_path):
    """`cpt-tui eval` on the demo's cpt-code export vs the `lm_eval` CLI run separately on the same export,
    same task files, batch size and limit: exactly equal. A task whose data file is missing fails alone."""
    pytest.importorskip("lm_eval")
    assert demo_run.result.returncode == 0
    run = _show(demo_run)["run"]
    run_dir = Path(run["run_dir"])
    tasks_dir, final = run_dir / "benchmarks" / "tasks", run_dir / "stages" / "cpt-code" / "final"
    assert (tasks_dir / "cpt_mc_prose.yaml").exists() and (final / "config.json").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    text = (tasks_dir / "cpt_ppl_code.yaml").read_text().replace("tag: cpt_local\n", "")
    (broken / "cpt_missing.yaml").write_text(text.replace("cpt_ppl_code", "cpt_missing"))
    db = tmp_path / "copy.db"  # the session's demo database stays as the run left it
    for suffix in ("", "-wal", "-shm"):
        if Path(str(demo_run.db) + suffix).exists():
            shutil.copy(str(demo_run.db) + suffix, str(db) + suffix)
    limit, batch = 12, 8
    ours = [sys.executable, "-m", "cpt_tui.cli", "eval", demo_run.run_id, "--db", str(db), "--stage", "cpt-code",
            "--tasks", "cpt_mc_prose,cpt_missing,cpt_ppl_code", "--include-path", "builtin:cpt-local",
            "--include-path", str(broken), "--limit", str(limit), "--batch-size", str(batch), "--device", "cpu"]
    lm_eval_bin = shutil.which("lm_eval", path=str(Path(sys.executable).parent)) or shutil.which("lm_eval")
    theirs = [lm_eval_bin, "--model", "hf", "--model_args", f"pretrained={final},dtype=auto",
              "--tasks", "cpt_mc_prose,cpt_ppl_code", "--include_path", str(tasks_dir), "--limit", str(limit),
              "--batch_size", str(batch), "--device", "cpu", "--output_path", str(tmp_path / "cli")]
    env = {**demo_run.env, "HF_DATASETS_OFFLINE": "1"}
    procs = [subprocess.Popen(c, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in (ours, theirs)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert procs[1].returncode == 0, outs[1][1][-3000:]
    assert procs[0].returncode == 1, outs[0][1][-3000:]  # 1: a task failed (its results are recorded)
    assert "cpt_missing" in outs[0][0] and "FAILED" in outs[0][0]
    (cli_json,) = (tmp_path / "cli").rglob("results_*.json")
    cli = json.loads(cli_json.read_text())
    doc = _show(demo_run, db)
    rows = [b for b in doc["benchmarks"] if b["stage"] == "cpt-code"]
    for task in ("cpt_mc_prose", "cpt_ppl_code"):
        theirs_m = {k.split(",")[0]: v for k, v in cli["results"][task].items() if k.endswith(",none")}
        names = {k for k in theirs_m if not k.endswith("_stderr")}
        got = {b["metric"]: b for b in rows if b["task"] == task}
        assert set(got) == names and names
        for name in names:
            assert got[name]["value"] == theirs_m[name], (task, name)  # exactly
            se = theirs_m.get(f"{name}_stderr")
            assert got[name]["stderr"] == (se if isinstance(se, float) else None), (task, name)
            assert got[name]["limit"] == limit and got[name]["status"] == "ok"
    (missing,) = [b for b in rows if b["task"] == "cpt_missing"]
    assert missing["status"] == "failed" and missing["metric"] is None
    assert "FileNotFoundError" in missing["reason"] and "cpt_missing.jsonl" in missing["reason"]
    # the untouched task of the in-run evaluation, the other stages and the run are unaffected
    assert any(b["task"] == "cpt_ppl_prose" and b["limit"] == 40 for b in rows)
    assert {b["stage"] for b in doc["benchmarks"]} == {"base-model", "base", "cpt-code"}
    assert doc["run"]["status"] == "done" and all(s["status"] == "done" for s in doc["stages"])


def test_eval_refuses_unfinished_or_unknown_stage(demo_run):
    r = run_cli(["eval", demo_run.run_id, "--stage", "nope", "--tasks", "cpt_mc_prose"], demo_run.env)
    assert r.returncode == 2 and "--stage nope: no such stage" in r.stderr
