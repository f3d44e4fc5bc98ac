"""Benchmarks on the manager side (issue 12): the plan-time task check, the evaluation subprocess
(`python -m engine.evaluate`) of a stage's export or of the starting model, recording its results in
the store, and the forgetting table the CLI (`show`, `eval`) and the UI (run detail, compare) print.

Never imports lm_eval or torch: lm-eval only ever runs in an engine subprocess. The evaluation of a
target (a stage name, or `base-model` for the starting model) lives in RUN_DIR/benchmarks/TARGET/
(engine/layout.py): results.json (RESULTS.json of engine/evaluate.py, the authoritative copy), eval.log.
A failed evaluation never fails its stage or the run: its tasks are recorded as failed, with the reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from engine.benchmarks import TAG as LOCAL_TAG, TASKS as LOCAL_TASKS  # names only (no lm_eval import)
from engine.layout import RunLayout
from engine.spec import BASE_MODEL, BUILTIN_TASKS, BenchmarksSpec, Preset, preset_error_at

CHECK_TIMEOUT = 300.0


# --------------------------------------------------------------------------- settings and the command


@dataclass
class Settings:
    """What one evaluation runs: the benchmarks block, or `cpt-tui eval`'s options."""
    tasks: list[str]
    include_path: list[str] = field(default_factory=list)  # may hold builtin:cpt-local
    num_fewshot: Optional[object] = None  # int or {task: int}
    limit: Optional[float] = None
    batch_size: object = 8
    device: Optional[str] = None
    dtype: str = "auto"
    max_length: Optional[int] = None
    bootstrap_iters: Optional[int] = None

    @classmethod
    def of(cls, spec: BenchmarksSpec) -> "Settings":
        return cls(tasks=list(spec.tasks), include_path=spec.include_paths(), num_fewshot=spec.num_fewshot,
                   limit=spec.limit, batch_size=spec.batch_size, device=spec.device, dtype=spec.dtype,
                   max_length=spec.max_length, bootstrap_iters=spec.bootstrap_iters)


def _num(v) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() and v >= 1 else str(v)


def default_device() -> str:
    return "cuda" if shutil.which("nvidia-smi") else "cpu"


def include_dirs(settings: Settings, layout: Optional[RunLayout]) -> list[str]:
    """The include path with builtin:cpt-local replaced by the run's written local task set."""
    out = []
    for p in settings.include_path:
        if p == BUILTIN_TASKS:
            if layout is None:
                raise ValueError(f"{BUILTIN_TASKS} needs a run directory")
            out.append(str(layout.benchmark_tasks))
        else:
            out.append(os.path.abspath(os.path.expanduser(os.path.expandvars(p))))
    return out


def command(model_dir: str, out: Path, settings: Settings, includes: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "engine.evaluate", "--model", str(model_dir), "--out", str(out),
            "--tasks", ",".join(settings.tasks)]
    for d in includes:
        argv += ["--include-path", d]
    if settings.num_fewshot is not None:
        nf = settings.num_fewshot
        argv += ["--num-fewshot", json.dumps(nf) if isinstance(nf, dict) else str(nf)]
    if settings.limit is not None:
        argv += ["--limit", _num(settings.limit)]
    argv += ["--batch-size", str(settings.batch_size), "--device", settings.device or default_device(),
             "--dtype", settings.dtype]
    if settings.max_length:
        argv += ["--max-length", str(settings.max_length)]
    if settings.bootstrap_iters is not None:
        argv += ["--bootstrap-iters", str(settings.bootstrap_iters)]
    return argv


def _engine_env() -> dict:
    from cpt_tui.procs import engine_env
    env = engine_env()
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    return env


def write_local_tasks(layout: RunLayout) -> None:
    """Write the local task set into the run directory (once; an engine subprocess, ~10 s)."""
    d = layout.benchmark_tasks
    if (d / "manifest.json").exists():
        return
    r = subprocess.run([sys.executable, "-m", "engine.benchmarks", str(d)], env=_engine_env(),
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"writing the local task set failed: {(r.stderr or r.stdout).strip()[-500:]}")


# --------------------------------------------------------------------------- running one evaluation


def failed_doc(settings: Settings, reason: str) -> dict:
    """A RESULTS.json-like document where every task failed (the evaluation itself could not run)."""
    return {"error": reason, "tasks": [{"task": t, "requested": t, "status": "failed", "reason": reason,
                                        "n_shot": None, "limit": settings.limit, "n_samples": None,
                                        "metrics": []} for t in settings.tasks]}


def evaluate(layout: RunLayout, target: str, model_dir: str, settings: Settings,
             wait: Optional[Callable[[], bool]] = None) -> dict:
    """Run engine.evaluate on `model_dir` into RUN_DIR/benchmarks/TARGET; returns the results document
    (every task failed, with the reason, when the process could not produce one). `wait()` is called
    while it runs (the supervisor beats there); it returns True to stop the evaluation."""
    from cpt_tui.procs import start_kept, tail

    bl = layout.benchmark(target)
    bl.root.mkdir(parents=True, exist_ok=True)
    try:
        if BUILTIN_TASKS in settings.include_path:
            write_local_tasks(layout)
        includes = include_dirs(settings, layout)
    except Exception as e:
        return failed_doc(settings, f"{type(e).__name__}: {e}")
    bl.results.unlink(missing_ok=True)
    argv = command(model_dir, bl.results, settings, includes)
    with open(bl.log, "ab") as log:
        log.write(("$ " + " ".join(argv) + "\n").encode())
        log.flush()
        proc = start_kept(argv, str(bl.exit_file), log, _engine_env())
    stopped = False
    while (code := proc.poll()) is None:
        if wait is not None and wait() and not stopped:
            proc.signal(15)
            stopped = True
        time.sleep(0.5)
    if bl.results.exists():
        return json.loads(bl.results.read_text())
    why = "stopped" if stopped else f"engine.evaluate exited with {code}: {tail(bl.log, 6).strip()[-800:]}"
    return failed_doc(settings, why)


def rows_of(doc: dict) -> list[dict]:
    """Store rows (BenchmarkRow fields) of a results document: each metric of an ok task, one row per
    failed task."""
    ts = time.time()
    rows = []
    for t in doc.get("tasks", []):
        base = {"task": t["task"], "requested": t.get("requested"), "n_shot": t.get("n_shot"),
                "limit": t.get("limit"), "n_samples": t.get("n_samples"), "ts": ts}
        if t["status"] != "ok" or not t.get("metrics"):
            rows.append({**base, "status": "failed", "reason": t.get("reason") or "no metrics", "metric": ""})
            continue
        for m in t["metrics"]:
            rows.append({**base, "status": "ok", "metric": m["metric"], "value": m.get("value"),
                         "stderr": m.get("stderr"), "higher_is_better": m.get("higher_is_better")})
    return rows


def record(store, run_id: str, target: str, doc: dict) -> list[dict]:
    rows = rows_of(doc)
    store.record_benchmarks(run_id, target, rows)
    return rows


def summary(doc: dict) -> str:
    ok = [t for t in doc.get("tasks", []) if t["status"] == "ok"]
    bad = [t for t in doc.get("tasks", []) if t["status"] != "ok"]
    s = f"{len(ok)}/{len(ok) + len(bad)} task(s) ok"
    if doc.get("seconds") is not None:
        s += f" in {doc['seconds']:.1f}s"
    for t in bad:
        s += f"; {t['task']} failed: {t.get('reason')}"
    return s


class RunBenchmarks:
    """The supervisor's side: the starting model once before the first stage, then each selected
    stage's export right after the stage ends. Already recorded targets are skipped (a resumed run);
    results written by a dead supervisor's evaluation are recorded without evaluating again."""

    def __init__(self, sup):
        self.sup = sup
        self.spec: BenchmarksSpec = sup.preset.benchmarks
        self.settings = Settings.of(self.spec)
        self.layout: RunLayout = sup.layout

    def _done(self, target: str) -> bool:
        return any(r.stage == target for r in self.sup.store.benchmarks(self.sup.run_id))

    def reference(self, prepared: dict) -> None:
        if self.spec.reference:
            self._run(BASE_MODEL, prepared["model_dir"])

    def after_stage(self, name: str) -> None:
        if name in self.spec.stage_names(self.sup.preset):
            self._run(name, str(self.layout.stage(name).final))

    def _run(self, target: str, model_dir: str) -> None:
        sup = self.sup
        if self._done(target) or sup.stop_requested:
            return
        res = self.layout.benchmark(target).results
        if res.exists():
            doc = json.loads(res.read_text())
        else:
            sup.event(state="benchmarks_started", target=target, tasks=",".join(self.settings.tasks))

            def wait() -> bool:
                sup.tick()
                return sup.stop_requested

            try:
                doc = evaluate(self.layout, target, model_dir, self.settings, wait)
            except Exception as e:  # never fail the run for its benchmarks
                doc = failed_doc(self.settings, f"{type(e).__name__}: {e}")
            if sup.stop_requested:
                return  # not recorded: evaluated again on resume
        record(sup.store, sup.run_id, target, doc)
        sup.event(state="benchmarks_done", target=target, summary=summary(doc))


# --------------------------------------------------------------------------- plan-time check


def _cache_file() -> Path:
    from cpt_tui import paths
    return Path(paths.cache_dir()) / "lm-eval-known-tasks.json"


def _lm_eval_version() -> Optional[str]:
    from importlib import metadata
    try:
        return metadata.version("lm-eval")
    except metadata.PackageNotFoundError:
        return None


def _dir_stamp(d: str) -> str:
    """Changes when a task YAML under `d` changes (names, sizes, mtimes)."""
    h = hashlib.sha256()
    for p in sorted(Path(d).rglob("*.yaml")) if os.path.isdir(d) else []:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def unknown_tasks(spec: BenchmarksSpec) -> tuple[list[str], Optional[str]]:
    """(unknown task names, a problem that prevented the check) for a benchmarks block. Instant when
    every name is of the built-in local set; otherwise lm-eval's registry is asked in a subprocess
    (`python -m engine.evaluate --list-tasks`, 15-50 s; the list is cached per lm-eval version and
    include path, so later checks of any preset are instant)."""
    includes = spec.include_paths()
    local_ok = BUILTIN_TASKS in includes
    rest = [t for t in spec.tasks if not (local_ok and t in (*LOCAL_TASKS, LOCAL_TAG))]
    if not rest:
        return [], None
    dirs = [d for d in include_dirs(replace(Settings.of(spec), include_path=[p for p in includes if p != BUILTIN_TASKS]),
                                    None)]
    for d in dirs:
        if not os.path.isdir(d):
            return [], f"include_path {d}: no such directory"
    version = _lm_eval_version()
    if version is None:
        return [], ("lm-eval is not installed in this Python (" + sys.executable + "): "
                    "pip install 'cpt-tui[eval]' (or lm-eval==0.4.13), or remove the benchmarks block")
    key = json.dumps([version, [(d, _dir_stamp(d)) for d in dirs]])
    cache = _cache_file()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:  # every name lm-eval knows with these include dirs: asked once, then cached
        argv = [sys.executable, "-m", "engine.evaluate", "--list-tasks"]
        for d in dirs:
            argv += ["--include-path", d]
        try:
            r = subprocess.run(argv, env=_engine_env(), capture_output=True, text=True, timeout=CHECK_TIMEOUT)
        except subprocess.TimeoutExpired:
            return [], f"listing lm-eval's tasks took over {CHECK_TIMEOUT:.0f}s"
        try:
            names = json.loads(r.stdout) if r.returncode == 0 else None
        except ValueError:
            names = None
        if not isinstance(names, list):
            return [], f"listing lm-eval's tasks failed (exit {r.returncode}): {r.stderr.strip()[-500:]}"
        known[key] = names
        while len(known) > 4:  # the latest few (lm-eval version, include path) combinations
            known.pop(next(iter(known)))
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known))
            tmp.replace(cache)
        except OSError:
            pass
    names = set(known[key])
    return [t for t in rest if t not in names], None


def check_preset(path, preset: Preset) -> None:
    """Raise a PresetError (file, YAML path, line) for a benchmarks block naming an unknown task."""
    spec = preset.benchmarks
    if spec is None:
        return
    unknown, problem = unknown_tasks(spec)
    if problem:
        raise preset_error_at(path, "benchmarks.tasks", problem)
    if unknown:
        j = next((i for i, t in enumerate(spec.tasks) if t in unknown), None)
        where = f"benchmarks.tasks[{j}]" if j is not None else "benchmarks.tasks"
        raise preset_error_at(path, where, f"unknown lm-eval task {unknown[0]!r}" +
                              (f" (also unknown: {', '.join(unknown[1:])})" if len(unknown) > 1 else "") +
                              "; see `lm_eval ls tasks`, or add its YAML folder to benchmarks.include_path")


# --------------------------------------------------------------------------- the forgetting table


@dataclass
class Cell:
    value: Optional[float] = None
    delta: Optional[float] = None  # vs the reference column
    better: Optional[bool] = None  # the delta's direction given the metric's (None: no delta / unknown)
    failed: Optional[str] = None  # the reason, for a failed task


@dataclass
class ForgettingTable:
    columns: list[str]  # base-model, then the stages
    rows: list[tuple[str, str]]  # (task or "val:DOMAIN", metric)
    cells: dict[tuple[int, int], Cell]
    limits: dict[str, object] = field(default_factory=dict)  # task -> limit used (None: all)

    def to_json(self) -> dict:
        return {"columns": self.columns, "rows": [
            {"task": t, "metric": m, "cells": {c: (vars(self.cells[(i, j)]) if (i, j) in self.cells else None)
                                               for j, c in enumerate(self.columns)}}
            for i, (t, m) in enumerate(self.rows)]}


def forgetting_table(bench_rows, stage_names: list[str], evals=()) -> ForgettingTable:
    """Rows = task·metric (and validation domains: the last validation loss of each stage), columns =
    base-model + each stage; a cell's delta is against the base-model column (or the first column with
    a value when the base model has none), `better` by the metric's direction (higher_is_better; lower
    for losses and perplexities)."""
    columns = [BASE_MODEL] + [s for s in stage_names if s != BASE_MODEL]
    rows: list[tuple[str, str]] = []
    vals: dict[tuple[str, str], dict[str, Cell]] = {}
    hib: dict[tuple[str, str], Optional[bool]] = {}
    limits: dict[str, object] = {}
    failed_tasks: dict[str, dict[str, str]] = {}
    for r in bench_rows:
        if r.stage not in columns:
            columns.append(r.stage)
        if r.status != "ok":
            failed_tasks.setdefault(r.task, {})[r.stage] = r.reason or "failed"
            continue
        key = (r.task, r.metric)
        if key not in vals:
            rows.append(key)
            vals[key] = {}
        vals[key][r.stage] = Cell(value=r.value)
        hib[key] = r.higher_is_better
        limits[r.task] = r.limit
    for task, by_stage in failed_tasks.items():
        keys = [k for k in rows if k[0] == task] or [(task, "")]
        for k in keys:
            if k not in vals:
                rows.append(k)
                vals[k] = {}
            for st, why in by_stage.items():
                vals[k].setdefault(st, Cell(failed=why))
    last: dict[tuple[str, str], dict[str, Cell]] = {}
    for e in evals:  # in time order: the last one of each stage wins
        if e["loss"] is None:
            continue
        k = (f"val:{e['domain']}", "loss")
        last.setdefault(k, {})[e["stage"]] = Cell(value=e["loss"])
    for k in sorted(last):
        rows.append(k)
        vals[k] = last[k]
        hib[k] = False
    for k in rows:
        if hib.get(k) is None and k[1]:
            hib[k] = not any(w in k[1] for w in ("perplexity", "bits_per_byte", "loss"))
    cells: dict[tuple[int, int], Cell] = {}
    for i, k in enumerate(rows):
        by = vals[k]
        ref_col = next((c for c in columns if c in by and by[c].value is not None), None)
        ref = by[ref_col].value if ref_col is not None else None
        for j, c in enumerate(columns):
            cell = by.get(c)
            if cell is None:
                continue
            if cell.value is not None and ref is not None and c != ref_col:
                cell.delta = cell.value - ref
                if cell.delta and hib.get(k) is not None and math.isfinite(cell.delta):
                    cell.better = (cell.delta > 0) == bool(hib[k])
            cells[(i, j)] = cell
    # Columns with no cell at all (a stage not evaluated, no validation) are dropped, except the stages.
    keep = [j for j, c in enumerate(columns) if c != BASE_MODEL or any((i, j) in cells for i in range(len(rows)))]
    remap = {j: n for n, j in enumerate(keep)}
    return ForgettingTable([columns[j] for j in keep], rows,
                           {(i, remap[j]): c for (i, j), c in cells.items() if j in remap}, limits)


def fmt_value(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}" if abs(v) < 1e6 else f"{v:.3e}"


def cell_text(cell: Optional[Cell]) -> tuple[str, Optional[bool]]:
    """(text, better) of a cell: 'value (+delta)', 'FAILED' or '-'."""
    if cell is None:
        return "-", None
    if cell.failed:
        return "FAILED", False
    s = fmt_value(cell.value)
    if cell.delta is not None:
        d = cell.delta
        s += f" ({d:+.4f})" if abs(d) < 100 else f" ({d:+.1f})" if abs(d) < 1e6 else f" ({d:+.3e})"
    return s, cell.better


def format_table(t: ForgettingTable, color: bool = False) -> str:
    """The table as text (ANSI colours: green better, red worse, when `color`)."""
    if not t.rows:
        return "(no benchmark results)"
    head = ["task", "metric", *t.columns]
    body = []
    for i, (task, metric) in enumerate(t.rows):
        line = [task, metric]
        for j in range(len(t.columns)):
            line.append(cell_text(t.cells.get((i, j))))
        body.append(line)
    widths = [max(len(head[k]), *(len(r[k] if k < 2 else r[k][0]) for r in body)) for k in range(len(head))]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    for r in body:
        parts = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        for k, (s, better) in enumerate(r[2:], start=2):
            s = s.ljust(widths[k])
            if color and better is not None:
                s = f"\033[{32 if better else 31}m{s}\033[0m"
            parts.append(s)
        out.append("  ".join(parts).rstrip())
    fails = sorted({(t.columns[j], t.rows[i][0], c.failed) for (i, j), c in t.cells.items() if c.failed})
    for col, task, why in fails:
        out.append(f"  {task} on {col} FAILED: {why}")
    lim = {k: v for k, v in t.limits.items() if v is not None}
    if lim:
        out.append("  (limited: " + ", ".join(f"{k} {_num(v)} examples" for k, v in lim.items()) +
                   " — smoke-test numbers)")
    return "\n".join(out)
