"""Experiment trackers — TensorBoard, Weights & Biases, MLflow — through accelerate's tracker classes
(accelerate.tracking.TensorBoardTracker / WandBTracker / MLflowTracker), on rank 0 only.

A preset's `trackers:` block (engine/spec.py TrackerSpec) reaches the trainer as the stage JSON's
`trackers` field (built by engine/tracker_config.py `stage_block`, called from engine/plan.py
stage_config; it is apart so that the plan never imports accelerate). The trainer wraps
its EventWriter with `with_trackers`: every `metric`, `eval` and `benchmark` event it emits is also
logged to each tracker, so the trackers show exactly what SQLite holds.

One tracker run per cpt-tui run; stages continue it:
- step: the stage's step + `step_offset` (the planned steps of the previous stages), so curves do not
  restart at a stage boundary; `tokens` (training tokens of the whole run so far) is logged with every
  value, as the other x-axis; `stage_index` too. A `start: resume` stage keeps the step of the
  checkpoint it resumes (engine/train.py), so its curve continues after a gap of that many steps.
- identity: TensorBoard writes to DIR/RUN_ID (default RUN_DIR/tensorboard/RUN_ID); W&B uses a run
  id derived from the cpt-tui run id with resume="allow"; MLflow finds the run by its
  `cpt_tui.run_id` tag (a file store in RUN_DIR/mlruns unless tracking_uri / MLFLOW_TRACKING_URI).
- tags: the stage's name and index (W&B run tags `stage:NAME`, MLflow tag `cpt_tui.stage`,
  TensorBoard a `stage` text entry at the stage's first step).
- config: the resolved preset, flattened (`stages.0.schedule.lr`), without environment values or
  notification URLs (secrets stay where they were: W&B reads WANDB_API_KEY from the environment).

A tracker that fails (cannot start, or a log call raises) is dropped with one `warning` event
(kind `tracker`): a tracker never stops a run.

Redone steps (a restart from the last checkpoint re-runs the steps after it): each step is shown once.
The trackers start when the attempt's `running` event says from which step it trains; the stage's
events log says up to which step earlier attempts logged.
- TensorBoard shows the latest attempt: its writer opens with `purge_step` (readers drop what earlier
  attempts wrote at or after it).
- MLflow would append a second value (it cannot delete one): it is not sent the steps it has (it writes
  each value synchronously), so it keeps the earlier attempt's values (bit-identical on a
  deterministic run; otherwise they differ from the store's latest attempt by the run's nondeterminism).
- W&B is sent everything: it ignores steps below the run's current one (a resumed online run starts at
  the server's last step), and what its service had not written when the trainer was killed -9 is
  lost with it (offline, the killed attempt's file held nothing), so the redone steps fill that gap.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Callable, Optional

from engine.tracker_config import flat_config, stage_block  # noqa: F401  (API: the stage JSON block)


# --------------------------------------------------------------------------- building accelerate's trackers


def wandb_run_id(run_id: str) -> str:
    """A W&B run id (letters, digits, - and _; at most 64) that is the same for every stage of a run."""
    clean = re.sub(r"[^A-Za-z0-9_-]", "-", run_id)
    if len(clean) <= 64:
        return clean
    return clean[:55] + "-" + hashlib.sha1(run_id.encode()).hexdigest()[:8]


def _mlflow_uri(spec: dict, run_dir: str) -> str:
    return spec.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or Path(run_dir, "mlruns").as_uri()


def _mlflow_existing_run(experiment: str, run_id: str) -> Optional[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`cpt_tui.run_id` = '{run_id}'",
                              max_results=1)
    return runs[0].info.run_id if runs else None


def build(spec: dict, block: dict, purge_step: Optional[int] = None):
    """One started accelerate tracker for `spec` (a TrackerSpec dump). `purge_step` (TensorBoard): hide
    what earlier writers logged at steps >= it."""
    run_id, run_dir, stage = block["run_id"], block["run_dir"], block["stage_name"]
    kind = spec["kind"]
    if kind == "tensorboard":
        from accelerate.tracking import TensorBoardTracker

        kw = {} if purge_step is None else {"purge_step": purge_step}
        t = TensorBoardTracker(run_id, spec.get("dir") or str(Path(run_dir, "tensorboard")), **kw)
    elif kind == "wandb":
        from accelerate.tracking import WandBTracker

        kw = {"id": wandb_run_id(run_id), "resume": "allow", "name": run_id, "dir": spec.get("dir") or run_dir,
              "entity": spec.get("entity"), "tags": [f"stage:{stage}"]}
        if spec.get("mode"):
            kw["mode"] = spec["mode"]
        Path(kw["dir"]).mkdir(parents=True, exist_ok=True)
        t = WandBTracker(spec.get("project") or "cpt", **kw)
    elif kind == "mlflow":
        import mlflow
        from accelerate.tracking import MLflowTracker

        uri = _mlflow_uri(spec, run_dir)
        if uri.startswith("file:") or "://" not in uri:  # MLflow ≥ 3.6 wants an opt-in for file stores
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        experiment = spec.get("experiment") or "cpt"
        t = MLflowTracker(experiment_name=experiment, run_id=_mlflow_existing_run(experiment, run_id),
                          run_name=run_id, tags={"cpt_tui.run_id": run_id, "cpt_tui.stage": stage,
                                                 "cpt_tui.stage_index": str(block["stage_index"])})
    else:
        raise ValueError(f"unknown tracker kind {kind!r}")
    t.start()
    if kind == "wandb" and t.run is not None:  # a resumed run keeps the tags of earlier stages
        t.run.tags = tuple(dict.fromkeys([*(t.run.tags or ()), f"stage:{stage}"]))
    return t


# --------------------------------------------------------------------------- logging


class Trackers:
    """The run's trackers in this stage (rank 0). `warn(message)` records a tracker failure. `logged`:
    the step up to which earlier attempts of the stage logged (see the module docstring)."""

    def __init__(self, block: dict, warn: Callable[[str], None], builder=build, logged: int = -1):
        self.block = block
        self.warn = warn
        self.builder = builder
        self.logged = logged
        self.step_offset = int(block.get("step_offset") or 0)
        self.tokens_offset = int(block.get("tokens_offset") or 0)
        self.stage_index = int(block.get("stage_index") or 0)
        self.last = (0, 0)  # (step, tokens) of the stage, from the last metric / eval
        self.active: list = []
        self.skip_upto: dict[int, int] = {}  # id(tracker) -> steps at or below it are not sent (-1: none)
        self.started = False
        self._staged = False

    def begin(self, start_step: int) -> None:
        """Start the trackers for an attempt that trains from `start_step` (its `running` event)."""
        if self.started:
            return
        self.started = True
        redone = self.logged > start_step
        for spec in self.block.get("trackers", []):
            try:
                purge = spec["kind"] == "tensorboard" and redone
                t = (self.builder(spec, self.block, purge_step=self.step_offset + start_step + 1) if purge
                     else self.builder(spec, self.block))
                if t.name != "tensorboard" or self.stage_index == 0:  # TensorBoard: a new sub-run each time
                    if self.logged < 0:  # (a restart: the first attempt stored it)
                        t.store_init_configuration(self.block.get("config") or {})
                # values at steps <= skip_upto are not sent (see the module docstring)
                self.skip_upto[id(t)] = self.logged if spec["kind"] == "mlflow" else -1
                self.active.append(t)
            except Exception as e:  # noqa: BLE001  (a tracker never stops the run)
                self.warn(f"tracker {spec.get('kind')}: could not start ({type(e).__name__}: {e}); "
                          "training continues without it")

    def _log(self, step: int, tokens: int, values: dict) -> None:
        self.begin(max(self.logged, 0))  # (a metric before any `running` event: nothing is redone)
        self.last = (step, tokens)
        gstep = self.step_offset + step
        values = {**values, "tokens": self.tokens_offset + tokens, "stage_index": self.stage_index}
        for t in list(self.active):
            if step <= self.skip_upto.get(id(t), -1):
                continue  # an earlier attempt logged this step to this tracker
            try:
                if not self._staged and t.name == "tensorboard":
                    t.log({"stage": f"{self.stage_index}: {self.block.get('stage_name')}"}, step=gstep)
                t.log(values, step=gstep)
            except Exception as e:  # noqa: BLE001
                self.active.remove(t)
                self.warn(f"tracker {t.name}: logging failed ({type(e).__name__}: {e}); it is dropped for this stage")
        self._staged = True

    def log_metric(self, step: int, tokens: int, values: dict) -> None:
        """A `metric` event's values (loss, lr, grad_norm, tokens_per_s, ...) under train/."""
        self._log(step, tokens, {f"train/{k}": v for k, v in values.items() if _number(v)})

    def log_eval(self, step: int, tokens: int, domain: str, loss: float) -> None:
        self._log(step, tokens, {f"eval/{domain}/loss": loss})

    def log_benchmark(self, task: str, metric: str, value: float, step: Optional[int] = None,
                      tokens: Optional[int] = None) -> None:
        """A benchmark result (the `benchmark` event), at the stage's last logged step by default."""
        s, t = self.last
        self._log(s if step is None else step, t if tokens is None else tokens, {f"bench/{task}/{metric}": value})

    def finish(self) -> None:
        for t in self.active:
            try:
                t.finish()
            except Exception as e:  # noqa: BLE001
                self.warn(f"tracker {t.name}: finishing failed ({type(e).__name__}: {e})")
        self.active = []


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_METRIC_SKIP = ("step", "tokens", "total_steps")


class TrackedWriter:
    """An EventWriter that also logs its metric / eval / benchmark events to the trackers."""

    def __init__(self, writer, trackers: Trackers):
        self._writer, self.trackers = writer, trackers

    def __getattr__(self, name):
        return getattr(self._writer, name)

    def emit(self, type: str, **fields):
        out = self._writer.emit(type, **fields)
        tr = self.trackers
        if type == "status" and fields.get("state") == "running":
            tr.begin(int(fields.get("step") or 0))
        elif type == "metric":
            tr.log_metric(fields["step"], fields["tokens"],
                          {k: v for k, v in fields.items() if k not in _METRIC_SKIP})
        elif type == "eval":
            tr.log_eval(fields["step"], fields["tokens"], fields["domain"], fields["loss"])
        elif type == "benchmark" and fields.get("status", "ok") == "ok" and _number(fields.get("value")):
            tr.log_benchmark(fields["task"], fields.get("metric", "value"), fields["value"],
                             fields.get("step"), fields.get("tokens"))
        return out

    def close(self):
        self.trackers.finish()
        return self._writer.close()


def with_trackers(writer, cfg: dict, rank: int):
    """`writer` itself without trackers or off rank 0; else a TrackedWriter (trackers start with the
    attempt's `running` event)."""
    block = cfg.get("trackers")
    if rank != 0 or not block or not block.get("trackers"):
        return writer
    trackers = Trackers(block, lambda msg: writer.emit("warning", kind="tracker", message=msg),
                        logged=writer.logged_upto)
    return TrackedWriter(writer, trackers)
