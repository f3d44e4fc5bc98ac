"""Checkpoints by default: a stage without a `checkpoint:` block checkpoints every 30 minutes of
training time (here a test-only interval of 3 s, CPT_TEST_CHECKPOINT_MINUTES) and at its end; killed
with -9 after its first time-based checkpoint it resumes from it. After that kill, show --json and the
curves' data (Store.metric_buckets) and the trackers (TensorBoard, W&B offline, MLflow file store) have
each step exactly once; the history keeps both attempts."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import yaml

from cpt_tui.store import Store
from engine.events import read_events
from engine.spec import parse_preset
from tests.demo_run import run_cli, tiny_preset, wait_for
from tests.test_supervisor import events, run_row, start, trainer_pids, wait_done


def test_default_cadence_and_off_in_the_spec():
    base = yaml.safe_load((Path(__file__).parents[1] / "presets" / "tiny-demo.yaml").read_text())
    for st in base["stages"]:
        del st["checkpoint"]
    p = parse_preset(yaml.safe_dump(base))
    assert p.stages[0].checkpoint.minutes == 30 and p.stages[0].checkpoint.enabled
    base["stages"][0]["checkpoint"] = False  # `checkpoint: off`
    base["stages"][1]["checkpoint"] = {"keep_last": 3}  # a block without a cadence: the default cadence
    p = parse_preset(yaml.safe_dump(base))
    assert not p.stages[0].checkpoint.enabled and p.stages[0].checkpoint.minutes is None
    assert p.stages[1].checkpoint.minutes == 30 and p.stages[1].checkpoint.keep_last == 3
    p = parse_preset((Path(__file__).parents[1] / "presets" / "tiny-demo.yaml").read_text())
    assert p.stages[0].checkpoint.minutes is None  # every_steps given: no time cadence added


def test_kill9_after_a_time_based_checkpoint_resumes_from_it(cpt_home, tmp_path):
    # A time-based checkpoint every 6 s; 0.1 s a step leaves the trainer ~14 s (not ~4 s at 0.05) after
    # the first one, for the supervisor to ingest it and the test to kill the trainer on a loaded machine.
    env = {**cpt_home, "CPT_TEST_CHECKPOINT_MINUTES": "0.1", "CPT_FAULT_SLOW_S": "0.1"}
    path = tiny_preset(tmp_path / "p.yaml", [("s1", 200)], name="tiny-ckpt")
    d = yaml.safe_load(path.read_text())
    del d["stages"][0]["checkpoint"]
    d["stages"][0]["log_every"] = 1
    d["trackers"] = [{"kind": "tensorboard"}, {"kind": "wandb", "project": "cpt", "mode": "offline"},
                     {"kind": "mlflow", "experiment": "cpt"}]
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    env.update(WANDB_SILENT="true", WANDB_MODE="offline")
    plan = run_cli(["plan", str(path)], env)
    assert "checkpoints: every 30 min (default) and at the end" in plan.stdout, plan.stdout
    run_id = start(env, path, "--max-restarts", "2", "--restart-backoff", "0.5", "--telemetry-interval", "0")
    run_dir = Path(run_row(env, run_id)["run_dir"])
    (ck,) = wait_for(lambda: events(env, run_id, "s1", "checkpoint")[:1], 240, "a first time-based checkpoint")
    wait_for(lambda: [e for e in events(env, run_id, "s1", "metric") if e["step"] >= ck["step"] + 5], 60,
             "steps past the checkpoint")
    (pid,) = wait_for(lambda: trainer_pids(run_dir), 10, "the trainer process")
    os.kill(pid, signal.SIGKILL)
    row = wait_done(env, run_id, 900)
    assert row["status"] == "done", row["error"]
    evs, _ = read_events(run_dir / "stages" / "s1" / "events.jsonl")
    resumed = [e for e in evs if e["type"] == "status" and e.get("resumed_from")]
    assert resumed, "the stage did not resume from a checkpoint"
    i = evs.index(resumed[0])
    last_ck = [e for e in evs[:i] if e["type"] == "checkpoint"][-1]
    assert resumed[0]["resumed_from"] == last_ck["path"] and last_ck["step"] >= ck["step"]
    assert evs[-2]["type"] == "checkpoint" or any(e["type"] == "checkpoint" and e["step"] == 200 for e in evs)

    # Each step exactly once in the reads; the history has the redone ones twice.
    show = json.loads(run_cli(["show", run_id, "--json"], env).stdout)
    steps = show["metric_steps"]["s1"]
    assert sorted(steps) == list(range(1, 201)) and show["metrics"] == 200
    redone = [e["step"] for e in evs[:i] if e["type"] == "metric" and e["step"] > last_ck["step"]]
    assert redone and show["metric_rows_all_attempts"] == 200 + len(redone)
    attempts = [a for a in show["attempts"] if a["stage"] == "s1"]
    assert [a["attempt"] for a in attempts] == [1, 2] and attempts[1]["start_step"] == last_ck["step"]
    with Store(env["CPT_TUI_DB"], readonly=True) as st:
        buckets = st.metric_buckets(run_id, "s1", 1, 200, 200, per_bucket=4)
        assert sum(b.n for b in buckets) == 200 and all(b.n == 1 for b in buckets)
        by_step = {m.step: m for m in st.metrics(run_id, "s1")}
        assert all(by_step[s].attempt == 2 for s in redone)
        ext = st.metric_extent(run_id, "s1")
        assert (ext["first_step"], ext["last_step"]) == (1, 200)
    _trackers_hold_each_step_once(run_dir, run_id, [(s, by_step[s].loss) for s in range(1, 201)], last_ck["step"])


def _trackers_hold_each_step_once(run_dir: Path, run_id: str, want: list[tuple[int, float]], resumed: int) -> None:
    """TensorBoard and MLflow have every step once, with the store's (latest-attempt) loss (bit-identical
    to the first attempt's on this deterministic CPU run). W&B: each step at most once under its own rule
    (a step below the run's current one is ignored), every step after the checkpoint the restart resumed
    from; the killed attempt's unwritten W&B records die with it (engine/trackers.py)."""
    import numpy as np
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.test_trackers import _wandb_history

    ea = EventAccumulator(str(run_dir / "tensorboard" / run_id), size_guidance={"scalars": 0})
    ea.Reload()
    f32 = np.float32
    assert [(e.step, f32(e.value)) for e in ea.Scalars("train/loss")] == [(s, f32(x)) for s, x in want]
    _, hist = _wandb_history(run_dir)
    kept: list[tuple[int, float]] = []
    for h in hist:
        if "train/loss" in h and (not kept or h["_step"] > kept[-1][0]):
            kept.append((h["_step"], h["train/loss"]))
    assert set(kept) <= set(want) and [s for s, _ in kept if s > resumed] == list(range(resumed + 1, 201))
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("cpt").experiment_id])
    got = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(got) == want
