"""Trackers (engine/trackers.py, issue 16): TensorBoard, W&B (offline) and MLflow (a local file store)
through accelerate's tracker classes.

The real run: a two-stage tiny preset with all three trackers, run through the CLI inside a network
namespace with only loopback (`unshare -n`; without it the test falls back to a dead proxy): the
TensorBoard event files (read back with tensorboard's EventAccumulator), the W&B offline run files
(its transaction log, read with wandb's protobufs) and the MLflow run each hold exactly the loss / LR
of the SQLite metric rows (and the eval losses), both stages, with steps increasing across the stage
boundary; one tracker run per cpt-tui run.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.demo_run import ROOT, tiny_preset

STEPS = (("s1", 16), ("s2", 12))


# --------------------------------------------------------------------------- units (no trackers installed needed)


class FakeTracker:
    def __init__(self, name, fail_log=False):
        self.name, self.fail_log, self.logged, self.config, self.finished = name, fail_log, [], None, False

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None):
        if self.fail_log:
            raise RuntimeError("boom")
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


class FakeWriter:
    def __init__(self):
        self.events, self.closed = [], False

    def emit(self, type, **fields):
        self.events.append((type, fields))

    def close(self):
        self.closed = True


def test_tracked_writer_logs_metrics_and_evals_with_offsets_and_survives_a_failing_tracker():
    from engine.trackers import TrackedWriter, Trackers

    good, bad = FakeTracker("good"), FakeTracker("bad", fail_log=True)
    made = iter([good, bad])
    w = FakeWriter()
    block = {"run_id": "r", "run_dir": "/x", "stage_index": 1, "stage_name": "s2", "step_offset": 100,
             "tokens_offset": 5000, "trackers": [{"kind": "a"}, {"kind": "b"}], "config": {"seed": 1}}
    tw = TrackedWriter(w, Trackers(block, lambda m: w.emit("warning", kind="tracker", message=m),
                                   builder=lambda spec, b: next(made)))
    tw.emit("metric", step=4, tokens=400, loss=2.5, lr=1e-3, grad_norm=None, tokens_per_s=10.0, total_steps=9)
    tw.emit("eval", step=4, tokens=400, domain="prose", loss=3.0, blocks=4)
    tw.emit("checkpoint", step=4, path="/p")
    tw.close()
    assert good.config == {"seed": 1} and good.finished and w.closed
    assert good.logged == [
        (104, {"train/loss": 2.5, "train/lr": 1e-3, "train/tokens_per_s": 10.0, "tokens": 5400, "stage_index": 1}),
        (104, {"eval/prose/loss": 3.0, "tokens": 5400, "stage_index": 1})]
    warnings = [f for t, f in w.events if t == "warning"]
    assert len(warnings) == 1 and "tracker bad: logging failed" in warnings[0]["message"]
    assert [t for t, _ in w.events].count("metric") == 1  # the event log got everything


def test_a_restarted_attempt_logs_each_step_once(tmp_path):
    """An attempt resumed at step 4 after an earlier one logged up to step 6: TensorBoard opens with
    purge_step (it shows the new attempt's 5..8), MLflow is sent only 7..8, W&B all of 5..8 (it drops
    steps below its own); the config is not stored again."""
    from engine.events import EventWriter
    from engine.trackers import with_trackers

    events = tmp_path / "events.jsonl"
    first = EventWriter(events, "s1")
    for step in range(1, 7):
        first.emit("metric", step=step, tokens=step * 10, loss=1.0, lr=1e-3, tokens_per_s=1.0)
    first.emit("eval", step=6, tokens=60, domain="d", loss=2.0)
    first.close()
    made, kwargs = [], []

    def builder(spec, block, **kw):
        kwargs.append((spec["kind"], kw))
        made.append(FakeTracker(spec["kind"]))
        return made[-1]

    cfg = {"trackers": {"run_id": "r", "run_dir": str(tmp_path), "stage_index": 0, "stage_name": "s1",
                        "step_offset": 100, "trackers": [{"kind": "tensorboard"}, {"kind": "mlflow"}, {"kind": "wandb"}],
                        "config": {"seed": 1}}}
    w = with_trackers(EventWriter(events, "s1"), cfg, 0)
    assert w.trackers.logged == 6 and not w.trackers.active  # nothing starts before the running event
    w.trackers.builder = builder
    w.emit("status", state="running", step=4)
    for step in range(5, 9):
        w.emit("metric", step=step, tokens=step * 10, loss=0.5, lr=1e-3, tokens_per_s=1.0)
    w.close()
    assert kwargs == [("tensorboard", {"purge_step": 105}), ("mlflow", {}), ("wandb", {})]
    tb, ml, wb = made
    assert [s for s, v in tb.logged if "train/loss" in v] == [105, 106, 107, 108]
    assert [s for s, v in ml.logged if "train/loss" in v] == [107, 108]
    assert [s for s, v in wb.logged if "train/loss" in v] == [105, 106, 107, 108]
    assert tb.config is None and ml.config is None and wb.config is None  # stored by the first attempt


def test_no_trackers_or_not_rank0_leaves_the_writer_alone():
    from engine.trackers import with_trackers

    w = FakeWriter()
    assert with_trackers(w, {"trackers": None}, 0) is w
    assert with_trackers(w, {"trackers": {"trackers": [{"kind": "tensorboard"}]}}, 1) is w


def test_config_is_the_flat_preset_without_env_or_notify_urls():
    from engine.spec import parse_preset
    from engine.tracker_config import flat_config

    doc = yaml.safe_load(tiny_preset(Path("/tmp/_unused_preset.yaml")).read_text())
    doc["cluster"] = {"env": {"WANDB_API_KEY": "sekrit-value"}}
    doc["notify"] = ["json://127.0.0.1:9/sekrit-token"]
    cfg = flat_config(parse_preset(yaml.safe_dump(doc)))
    assert cfg["stages.0.schedule.lr"] == 3.0e-3 and cfg["name"] == "tiny-sup"
    assert all(isinstance(v, (bool, int, float, str)) for v in cfg.values())
    assert "sekrit" not in json.dumps(cfg)


def test_a_tracker_that_is_not_installed_is_exit_2_at_plan_naming_the_extra(tmp_path, monkeypatch, capsys):
    from cpt_tui.cli import main
    from engine import spec

    monkeypatch.setitem(spec.TRACKER_EXTRAS, "wandb", ("no_such_module_wandb_xyz", "wandb"))
    p = tiny_preset(tmp_path / "p.yaml")
    doc = yaml.safe_load(p.read_text())
    doc["trackers"] = [{"kind": "wandb", "project": "cpt"}]
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert main(["plan", str(p)]) == 2
    err = capsys.readouterr().err
    assert "trackers[0]" in err and "pip install 'cpt-tui[wandb]'" in err and "line" in err


# --------------------------------------------------------------------------- the real run


def _wandb_history(run_dir: Path) -> tuple[set, list[dict]]:
    """(run ids, history rows) of every offline W&B run file under run_dir/wandb."""
    from wandb.proto import wandb_internal_pb2 as pb

    ids, rows = set(), []
    for f in sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "*.wandb"))):
        data = Path(f).read_bytes()
        assert data[:4] == b":W&B"
        pos, block, buf = 7, 32768, b""  # a LevelDB-style log: 32 KiB blocks of (crc, length, type) records
        while pos + 7 <= len(data):
            left = block - pos % block
            if left < 7:
                pos += left
                continue
            _crc, ln, typ = struct.unpack("<IHB", data[pos:pos + 7])
            if typ == 0 and ln == 0:
                pos += left
                continue
            chunk, pos = data[pos + 7:pos + 7 + ln], pos + 7 + ln
            buf = chunk if typ in (1, 2) else buf + chunk
            if typ in (1, 4):
                r = pb.Record()
                r.ParseFromString(buf)
                kind = r.WhichOneof("record_type")
                if kind == "run":
                    ids.add(r.run.run_id)
                elif kind == "history":
                    rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return ids, rows


@pytest.mark.timeout(600)
def test_tensorboard_wandb_offline_and_mlflow_hold_exactly_the_sqlite_metrics(cpt_home, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    p = tiny_preset(tmp_path / "trk.yaml", stages=STEPS, every=1000, name="trk")
    doc = yaml.safe_load(p.read_text())
    doc["trackers"] = [{"kind": "tensorboard"}, {"kind": "wandb", "project": "cpt", "mode": "offline"},
                       {"kind": "mlflow", "experiment": "cpt"}]
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    env = {**cpt_home, "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "cpt_tui.cli", "--run", str(p)]
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up 2>/dev/null; exec "$@"', "sh", *cmd]
    else:  # no network namespace here: any HTTP(S) attempt goes to a dead proxy
        env.update(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="")
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    con = sqlite3.connect(env["CPT_TUI_DB"])
    run_id, run_dir = con.execute("SELECT id, run_dir FROM runs").fetchone()
    run_dir = Path(run_dir)
    offset = {"s1": 0, "s2": STEPS[0][1]}
    metrics = [(offset[s] + step, loss, lr) for s, step, loss, lr in
               con.execute("SELECT stage, step, loss, lr FROM metrics WHERE run_id = ? ORDER BY ts, seq", [run_id])]
    evals = [(offset[s] + step, d, loss) for s, step, d, loss in
             con.execute("SELECT stage, step, domain, loss FROM eval WHERE run_id = ? ORDER BY ts, seq", [run_id])]
    warnings = con.execute("SELECT data FROM events WHERE type = 'warning'").fetchall()
    assert not [w for w in warnings if "tracker" in w[0]], warnings
    assert len(metrics) == sum(n for _, n in STEPS) and evals
    steps = [s for s, _, _ in metrics]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == len(steps)  # across the boundary

    # TensorBoard: exactly the SQLite values (stored as float32), monotonically increasing steps.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard" / run_id), size_guidance={"scalars": 0})
    ea.Reload()
    f32 = np.float32
    assert [(e.step, f32(e.value)) for e in ea.Scalars("train/loss")] == [(s, f32(x)) for s, x, _ in metrics]
    assert [(e.step, f32(e.value)) for e in ea.Scalars("train/lr")] == [(s, f32(x)) for s, _, x in metrics]
    tb_steps = [e.step for e in ea.Scalars("train/loss")]
    assert all(a < b for a, b in zip(tb_steps, tb_steps[1:]))
    for domain in {d for _, d, _ in evals}:
        got = [(e.step, f32(e.value)) for e in ea.Scalars(f"eval/{domain}/loss")]
        assert got == [(s, f32(x)) for s, d, x in evals if d == domain]

    # W&B offline: one run id for both stages, history equal to SQLite (JSON floats: exact).
    ids, hist = _wandb_history(run_dir)
    assert len(ids) == 1
    assert [(h["_step"], h["train/loss"], h["train/lr"]) for h in hist if "train/loss" in h] == metrics

    # MLflow, file store in RUN_DIR/mlruns: one run, tagged with the cpt-tui run id, metrics equal.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    exp = client.get_experiment_by_name("cpt")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["cpt_tui.run_id"] == run_id
    mid = runs[0].info.run_id
    for key, col in (("train/loss", 1), ("train/lr", 2)):
        got = sorted((m.step, m.value) for m in client.get_metric_history(mid, key))
        assert got == [(m[0], m[col]) for m in metrics]
    assert runs[0].data.params["name"] == "trk"
