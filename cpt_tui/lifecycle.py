"""The run lifecycle API that the CLI and the UI both call: create a run and start its detached
supervisor, stop it, resume or re-adopt it, find orphans. Never imports torch.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from cpt_tui.backends import LaunchError, backend_for
from cpt_tui.paths import cache_dir, runs_dir
from cpt_tui.presets import Invalid, load_checked
from cpt_tui.procs import engine_env, procs_of, supervisor_alive, supervisor_env, tail
from cpt_tui.store import TERMINAL, Store
from cpt_tui.supervisor import DEFAULTS, RUN_STREAM
from engine.layout import RunLayout
from engine.errors import CptError
from engine.spec import Preset, load_preset

__all__ = ["new_run_id", "create_run", "spawn", "start_detached", "request_stop", "resume", "orphans",
           "adopt_orphans", "supervisor_alive", "engine_env"]


def new_run_id(preset: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{preset}-{secrets.token_hex(2)}"


def resume(db_path: str | Path, run_id: str) -> tuple[str, Optional[dict], Optional[int]]:
    """Continue a stopped or failed run, or re-adopt one whose supervisor died (the CLI's `resume` and
    the UI's resume action). Returns (what, run row, supervisor pid): what is 'done' (nothing to do),
    'supervised' (a live supervisor owns it) or 'resumed'. Raises RuntimeError if no supervisor starts."""
    store = Store(db_path, readonly=True)
    try:
        run = store.run(run_id)
    finally:
        store.close()
    if run is None:
        raise Invalid(f"{run_id}: no such run (see `cpt-tui runs`)")
    if run["status"] == "done":
        return "done", run, None
    if supervisor_alive(run):
        return "supervised", run, run["pid"]
    return "resumed", run, spawn(run["id"], db_path)


def create_run(store: Store, preset_path: Path, preset: Preset, plan: dict, options: dict) -> str:
    run_id = new_run_id(preset.name)
    run_dir = runs_dir() / run_id
    run_dir.mkdir(parents=True)
    shutil.copyfile(preset_path, RunLayout(run_dir).preset)
    store.create_run(run_id, preset.name, str(preset_path), str(run_dir), plan, socket.gethostname())
    store.update_run(run_id, options=json.dumps(options))
    for i in range(options.get("from_stage") or 0):  # --from-stage: the stages before it do not run here
        store.update_stage(run_id, i, status="skipped")
    return run_id


def resolve_from_stage(db_path: str | Path, preset_path: Path, preset: Preset, from_stage: Optional[str],
                       init_from: Optional[str]) -> dict:
    """`--from-stage NAME [--init-from RUN[:STAGE]|DIR]` → run options (from_stage index, init_dir and the
    lineage recorded with the run). Raises Invalid naming what is wrong; nothing is created."""
    if from_stage is None:
        if init_from is not None:
            raise Invalid("--init-from needs --from-stage NAME (the stage that starts from it)")
        return {}
    names = [s.name for s in preset.stages]
    if from_stage not in names:
        raise Invalid(f"--from-stage {from_stage}: {preset_path} has no such stage (stages: {', '.join(names)})")
    idx = names.index(from_stage)
    st = preset.stages[idx]
    skipped = names[:idx]
    for j in range(idx + 1, len(names)):
        later = preset.stages[j]
        if later.from_ in skipped and later.start != "previous":
            raise Invalid(f"{preset_path}: stages[{j}].from: stage {later.name!r} starts from {later.from_!r}, "
                          f"which --from-stage {from_stage} skips")
    needs = idx > 0 and (st.start == "previous" or st.from_ in skipped)
    if init_from is None:
        if needs:
            raise Invalid(f"--from-stage {from_stage}: its start ({st.start}"
                          f"{' ' + st.from_ if st.from_ else ''}) is a stage this run skips: give --init-from "
                          "RUN[:STAGE] (a finished stage of an earlier run) or --init-from DIR (a model directory)")
        return {"from_stage": idx, "lineage": {"from_stage": from_stage, "init_from": None}}
    lineage: dict = {"from_stage": from_stage}
    ref = init_from
    run_ref, _, stage_ref = ref.partition(":")
    path = Path(os.path.expanduser(ref))
    init: dict
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "trainer_state.json").exists():
            raise Invalid(f"--init-from {ref}: a directory, but neither a model (config.json) nor a checkpoint "
                          "(trainer_state.json)")
        ck = str(path.resolve()) if (path / "trainer_state.json").exists() else None
        init = {"dir": str(path.resolve()), "checkpoint": ck}
        lineage["init_from"] = {"dir": init["dir"]}
    else:
        store = Store(db_path, readonly=True) if Path(db_path).exists() else None
        row = store.run(run_ref) if store else None
        if row is None:
            if store:
                store.close()
            raise Invalid(f"--init-from {ref}: neither an existing directory nor a run in {db_path} "
                          "(see `cpt-tui runs`)")
        try:
            stages = {s["name"]: s for s in store.stages(row["id"])}
        finally:
            store.close()
        stage_ref = stage_ref or (names[idx - 1] if idx else "")
        if stage_ref not in stages:
            raise Invalid(f"--init-from {ref}: run {row['id']} has no stage {stage_ref!r} "
                          f"(its stages: {', '.join(stages)}); give RUN:STAGE")
        if stages[stage_ref]["status"] != "done":
            raise Invalid(f"--init-from {ref}: stage {stage_ref!r} of run {row['id']} is {stages[stage_ref]['status']}, "
                          "not done: its final model does not exist")
        sl = RunLayout(row["run_dir"]).stage(stage_ref)
        if not sl.final.is_dir():
            raise Invalid(f"--init-from {ref}: {sl.final} is missing")
        ck = sl.latest_checkpoint()
        init = {"dir": str(sl.final), "checkpoint": str(ck) if ck else None}
        # the earlier run's tokens before this one (a tokens-seen axis across runs)
        tokens = sum(s["tokens"] or 0 for n, s in stages.items()
                     if s["idx"] <= stages[stage_ref]["idx"] and s["status"] == "done")
        lineage["init_from"] = {"run": row["id"], "stage": stage_ref, "dir": init["dir"],
                                "stages": [n for n, s in stages.items() if s["idx"] <= stages[stage_ref]["idx"]
                                           and s["status"] == "done"], "tokens_before": tokens}
    return {"from_stage": idx, "init_dir": init, "lineage": lineage}


def spawn(run_id: str, db_path: str | Path, timeout: float = 120) -> int:
    """Start the run's supervisor detached (new session, stdio to RUN_DIR/supervisor.log, reparented
    to init); returns its pid once it owns the run."""
    db_path = Path(db_path).resolve()
    store = Store(db_path, readonly=True)
    try:
        log_path = RunLayout(store.run(run_id)["run_dir"]).supervisor_log
        with open(log_path, "ab") as log:
            p = subprocess.Popen([sys.executable, "-m", "cpt_tui.supervisor", run_id, "--db", str(db_path), "--fork"],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=supervisor_env(),
                                 start_new_session=True)
        rc = p.wait(timeout)
        if rc == 3:
            raise RuntimeError(f"run {run_id} already has a live supervisor")
        if rc != 0:
            raise RuntimeError(f"the supervisor of run {run_id} did not start:{tail(log_path)}")
        return store.run(run_id)["pid"]
    finally:
        store.close()


def start_detached(preset_path: str | Path, db_path: str | Path, from_stage: Optional[str] = None,
                   init_from: Optional[str] = None, **options) -> str:
    """Validate a preset (name or path), check every node, create the run and start its detached
    supervisor. Returns the run id. Raises `cpt_tui.presets.Invalid` (nothing created) for an invalid
    preset, a missing input path, or a node that fails preflight (the message names the node).
    `options`: see DEFAULTS (max_restarts, backoff, telemetry_interval, ...). `from_stage` / `init_from`:
    run the plan from that stage, started from a finished stage of an earlier run or a directory."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown options: {sorted(unknown)}")
    path, preset, plan = load_checked(str(preset_path), check_paths=True)
    lineage = resolve_from_stage(db_path, Path(path), preset, from_stage, init_from)
    try:
        backend = backend_for(preset.cluster)
        backend.preflight(stages=preset.stages)
        backend.preflight_disk(preset, plan)  # before data preparation (shared_fs: false: each node's disk)
        backend.commands(preset.stages[0], "stage.json", "<unused>", write_configs=False)
    except LaunchError as e:
        raise Invalid(f"{path}: cluster: {e}") from None
    warnings = judge_memory(preset, plan, backend.reports)
    store = Store(db_path)
    try:
        opts = {**DEFAULTS, **options, **lineage, "cache": str(cache_dir().resolve()), "cwd": os.getcwd()}
        run_id = create_run(store, Path(path).resolve(), preset, plan, opts)
        for msg in warnings:
            store.add_event(run_id, RUN_STREAM, "warning", kind="memory", message=msg)
        try:
            spawn(run_id, db_path)
        except RuntimeError as e:
            store.update_run(run_id, status="failed", error=str(e), finished=time.time())
            raise
    finally:
        store.close()
    return run_id


def judge_memory(preset: Preset, plan: dict, reports: dict) -> list[str]:
    """Judge each stage's memory estimate (the plan's `memory`, updated in place) against the smallest
    GPU the preflight probes saw, unless the preset sets cluster.gpu_memory_gb. Returns a warning per
    stage that does not fit (an estimate: the run is not refused)."""
    from engine.memory import judge_against, smallest_gpu

    gpu = None if preset.cluster.gpu_memory_gb else smallest_gpu(reports)
    if gpu is None:
        return []
    out = []
    for st in plan["stages"]:
        mem = st.get("memory")
        if mem is None:
            continue
        st["memory"] = mem = judge_against(mem, *gpu)
        if mem["verdict"] == "does not fit":
            out.append(f"stage {st['name']}: the memory estimate is {mem['per_process_gpu_bytes'] / 2**30:.1f} GiB "
                       f"per process, more than the smallest GPU ({gpu[1]}); lower micro_batch_size, turn on "
                       "gradient_checkpointing or raise zero_stage (`cpt-tui plan` shows the parts)")
    return out


def request_stop(store: Store, run_id: str) -> str:
    """Ask the run to stop gracefully. With a live supervisor: SIGTERM to it (it SIGTERMs the trainer,
    which checkpoints). Orphaned run: SIGTERM the recorded local trainers here and mark the run stopped
    once they exit. Returns what was done ('signalled', 'stopped', 'not running')."""
    row = store.run(run_id)
    if row["status"] in TERMINAL:
        return "not running"
    if supervisor_alive(row):
        if row["host"] != socket.gethostname():
            raise Invalid(f"run {run_id} is supervised on host {row['host']}: run `cpt-tui stop` there")
        os.kill(row["pid"], signal.SIGTERM)
        return "signalled"
    procs = [p for s in store.stages(run_id) for p in procs_of(s)]
    backend = _backend_of(row) if any(p.backend not in ("local", "ssh") for p in procs) else None
    if backend is not None:  # a scheduler's jobs (Slurm): its stop, by job id
        backend.stop(procs)
    else:
        for p in procs:
            p.signal(signal.SIGTERM)
    poll = backend.poll if backend is not None else (lambda ps: [p.poll() for p in ps])
    deadline = time.monotonic() + DEFAULTS["stop_timeout"]
    while any(c is None for c in poll(procs)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for s in store.stages(run_id):
        if s["status"] == "running":
            store.update_stage(run_id, s["idx"], status="stopped")
    store.update_run(run_id, status="stopped", finished=time.time())
    store.add_event(run_id, RUN_STREAM, "status", state="stopped", reason="stopped while unsupervised")
    return "stopped"


def _backend_of(row: dict):
    """The launch backend of a run, from its preset copy (None if it cannot be read)."""
    try:
        return backend_for(load_preset(RunLayout(row["run_dir"]).preset).cluster)
    except (OSError, ValueError, CptError):
        return None


def orphans(store: Store) -> list[dict]:
    """Runs that should be running but whose supervisor is gone."""
    out = []
    for r in store.active_runs():
        if r["status"] == "queued" and time.time() - (r["created"] or 0) < 60:
            continue  # being started right now
        if not supervisor_alive(r):
            out.append(r)
    return out


def adopt_orphans(db_path: str | Path) -> list[str]:
    """Start a new supervisor for every orphaned run in the database (any `cpt-tui` start calls this)."""
    db_path = Path(db_path)
    if not db_path.exists():
        return []
    store = Store(db_path, readonly=True)
    try:
        ids = [r["id"] for r in orphans(store)]
    finally:
        store.close()
    adopted = []
    for run_id in ids:
        try:
            spawn(run_id, db_path)
            adopted.append(run_id)
        except RuntimeError:
            pass  # another cpt-tui adopted it first
    return adopted
