"""engine/evaluate.py and engine/benchmarks: benchmarks with lm-eval, in their own process.

One tiny Llama (hidden 32, 1 layer, 64 positions, so rolling windows really roll) with a tokenizer
trained on the fly; the shipped local task set written once. Then, concurrently:
  `python -m engine.evaluate` on cpt_mc_prose, a task whose data file is missing, and cpt_ppl_code;
  the `lm_eval` CLI on cpt_mc_prose and cpt_ppl_code (same task files, batch size, limit);
and the metrics must be EXACTLY equal: an independent cross-check through lm-eval's own CLI.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[1]
LIMIT, BATCH = 12, 4


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def env(work) -> dict:
    e = dict(os.environ)
    e.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             HF_DATASETS_CACHE=str(work / "hf-datasets"), OMP_NUM_THREADS="1")
    return e


@pytest.fixture(scope="module")
def model_dir(work) -> Path:
    from transformers import AutoTokenizer

    from engine.data.builtin import stdlib_prose
    from engine.model import build_from_config
    from engine.spec import ArchConfig
    from engine.tokenizer import train_bpe

    out = work / "model"
    train_bpe(itertools.islice(stdlib_prose(), 2000), 400, out, 200_000)
    tok = AutoTokenizer.from_pretrained(str(out))
    arch = ArchConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      max_position_embeddings=64)
    build_from_config(arch, len(tok), out, seed=0, tokenizer=tok)
    return out


@pytest.fixture(scope="module")
def tasks_dir(work) -> Path:
    from engine.benchmarks import write_local_tasks

    d = write_local_tasks(work / "tasks")
    # a task whose dataset is missing: cpt_ppl_code's YAML pointing at a file that does not exist
    text = (d / "cpt_ppl_code.yaml").read_text().replace("tag: cpt_local\n", "")
    (d / "cpt_missing.yaml").write_text(text.replace("cpt_ppl_code", "cpt_missing"))
    return d


@pytest.fixture(scope="module")
def runs(work, env, model_dir, tasks_dir):
    """Both evaluations, run at the same time (two processes)."""
    ours = [sys.executable, "-m", "engine.evaluate", "--model", str(model_dir), "--out", str(work / "ours.json"),
            "--tasks", "cpt_mc_prose,cpt_missing,cpt_ppl_code", "--include-path", str(tasks_dir),
            "--limit", str(LIMIT), "--batch-size", str(BATCH), "--device", "cpu"]
    lm_eval_bin = shutil.which("lm_eval", path=str(Path(sys.executable).parent)) or shutil.which("lm_eval")
    theirs = [lm_eval_bin, "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=auto",
              "--tasks", "cpt_mc_prose,cpt_ppl_code", "--include_path", str(tasks_dir), "--limit", str(LIMIT),
              "--batch_size", str(BATCH), "--device", "cpu", "--output_path", str(work / "cli")]
    procs = [subprocess.Popen(c, env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in (ours, theirs)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    ours_rc, theirs_rc = (p.returncode for p in procs)
    assert theirs_rc == 0, outs[1][-3000:]
    (cli_json,) = (work / "cli").rglob("results_*.json")
    return {"rc": ours_rc, "log": outs[0], "ours": json.loads((work / "ours.json").read_text()),
            "cli": json.loads(cli_json.read_text())}


def test_local_tasks_written_with_absolute_paths(tasks_dir):
    manifest = json.loads((tasks_dir / "manifest.json").read_text())
    assert set(manifest["tasks"]) == {"cpt_mc_prose", "cpt_ppl_code", "cpt_ppl_prose"}
    for name, info in manifest["tasks"].items():
        assert info["examples"] >= 50, name
        text = (tasks_dir / f"{name}.yaml").read_text()
        assert f'test: "{tasks_dir}/{name}.jsonl"' in text and "@DATA_DIR@" not in text
    rows = [json.loads(x) for x in (tasks_dir / "cpt_mc_prose.jsonl").read_text().splitlines()]
    assert all(len(r["choices"]) == 4 and 0 <= r["gold"] < 4 and len(set(r["choices"])) == 4 for r in rows)
    assert len({r["gold"] for r in rows}) == 4  # the answer is not always in the same place


def test_engine_evaluate_equals_lm_eval_cli(runs):
    assert runs["rc"] == 0, runs["log"][-3000:]
    ours = {t["task"]: t for t in runs["ours"]["tasks"]}
    cli = runs["cli"]
    for task in ("cpt_mc_prose", "cpt_ppl_code"):
        assert ours[task]["status"] == "ok"
        assert ours[task]["n_samples"] == LIMIT and ours[task]["n_shot"] == cli["n-shot"][task] == 0
        theirs = {k.split(",")[0]: v for k, v in cli["results"][task].items() if k.endswith(",none")}
        got = {m["metric"]: m for m in ours[task]["metrics"]}
        names = {k for k in theirs if not k.endswith("_stderr")}
        assert set(got) == names, (got, theirs)
        for name in names:
            assert got[name]["value"] == theirs[name], (task, name)  # exactly, not approximately
            se = theirs.get(f"{name}_stderr")
            assert got[name]["stderr"] == (se if isinstance(se, float) else None), (task, name)
    assert {m["metric"] for m in ours["cpt_ppl_code"]["metrics"]} == {"word_perplexity", "byte_perplexity",
                                                                       "bits_per_byte"}
    assert [m["higher_is_better"] for m in ours["cpt_ppl_code"]["metrics"]] == [False] * 3
    assert runs["ours"]["lm_eval_version"] and runs["ours"]["seconds"] > 0


def test_missing_dataset_fails_that_task_only(runs, tasks_dir):
    assert runs["rc"] == 0
    tasks = runs["ours"]["tasks"]
    assert [t["task"] for t in tasks] == ["cpt_mc_prose", "cpt_missing", "cpt_ppl_code"]  # the order asked
    missing = tasks[1]
    assert missing["status"] == "failed" and missing["metrics"] == []
    assert "cpt_missing.jsonl" in missing["reason"] and "FileNotFoundError" in missing["reason"]
    assert [t["status"] for t in tasks] == ["ok", "failed", "ok"]
    assert "cpt_missing FAILED" in runs["log"]


def test_benchmark_events(runs, tmp_path):
    """Each metric of an ok task and each failed task becomes one `benchmark` event of the schema."""
    from engine import evaluate, events

    w = events.EventWriter(tmp_path / "events.jsonl", "cpt-code")
    n = evaluate.emit_events(w, runs["ours"])
    w.close()
    recs, _ = events.read_events(tmp_path / "events.jsonl")
    assert n == len(recs) == 2 + 1 + 3  # acc, acc_norm; the failed task; three perplexity metrics
    assert events.validate_log(recs) == []
    assert [r["status"] for r in recs if r["task"] == "cpt_missing"] == ["failed"]


def test_check_tasks(tasks_dir, monkeypatch, capsys):
    from engine import evaluate

    tm = evaluate.task_manager([tasks_dir])  # indexes every lm-eval YAML once (no dataset is opened)
    names = ["cpt_mc_prose", "cpt_local", "arc_easy", "hellaswag", "mmlu", "ai2_arc", "no_such_task"]
    assert evaluate.check_tasks(names, manager=tm) == ["no_such_task"]
    assert evaluate.check_tasks(["cpt_mc_prose"], manager=evaluate.task_manager(None, include_defaults=False)) \
        == ["cpt_mc_prose"]  # the local task needs its include path

    monkeypatch.setattr(evaluate, "task_manager", lambda *a, **k: tm)
    assert evaluate.main(["--tasks", "cpt_ppl_code,arc_easy", "--include-path", str(tasks_dir), "--check-only"]) == 0
    assert evaluate.main(["--tasks", "cpt_ppl_code,hellaswagg", "--include-path", str(tasks_dir),
                          "--check-only"]) == 2
    assert "unknown lm-eval task: hellaswagg" in capsys.readouterr().err
    assert evaluate.main(["--tasks", "cpt_ppl_code", "--num-fewshot", '{"other": 1}', "--check-only"]) == 2
    capsys.readouterr()
    assert evaluate.main(["--list-tasks", "--include-path", str(tasks_dir)]) == 0  # the manager's cached registry
    listed = json.loads(capsys.readouterr().out)
    assert {"cpt_mc_prose", "cpt_local", "arc_easy", "mmlu"} <= set(listed) and "no_such_task" not in listed
