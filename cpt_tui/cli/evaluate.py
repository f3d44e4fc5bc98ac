"""`cpt-tui eval RUN [--stage NAME[,NAME]] [--tasks T1,T2] [--include-path DIR] [--num-fewshot K]
[--limit N] [--batch-size B]`: benchmarks of finished stages after the fact (no retraining), and of the
starting model with `--stage base-model`. Settings default to the run's `benchmarks:` block; the
evaluation is the in-run one (`python -m engine.evaluate`, its own process) and its results replace the
stored rows of the same stage and task. Prints the run's forgetting table. Exit 0, or 1 when a task failed.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace

from cpt_tui import paths
from cpt_tui.cli.common import EXIT_FAILED, run_row
from cpt_tui.presets import Invalid


def _settings(a, preset):
    from cpt_tui.benchmarks import LOCAL_TAG, LOCAL_TASKS, Settings
    from engine.spec import BUILTIN_TASKS

    base = Settings.of(preset.benchmarks) if preset.benchmarks else None
    if a.tasks:
        tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
        s = replace(base, tasks=tasks) if base else Settings(tasks=tasks)
    elif base:
        s = base
    else:
        raise Invalid(f"run {a.run_id}: its preset has no benchmarks block: give --tasks")
    if a.include_path:
        s = replace(s, include_path=list(a.include_path))
    elif not s.include_path and all(t in (*LOCAL_TASKS, LOCAL_TAG) for t in s.tasks):
        s = replace(s, include_path=[BUILTIN_TASKS])  # the local set needs no path
    if a.num_fewshot is not None:
        nf = a.num_fewshot
        try:
            s = replace(s, num_fewshot=json.loads(nf) if nf.strip().startswith("{") else int(nf))
        except ValueError:
            raise Invalid(f"--num-fewshot {nf}: an integer, or JSON {{\"task\": K}}") from None
    for opt in ("limit", "batch_size", "device"):
        if getattr(a, opt) is not None:
            s = replace(s, **{opt: getattr(a, opt)})
    return s


def _limit(v: str) -> float:
    x = float(v)
    if x <= 0:
        raise ValueError(v)
    return int(x) if x >= 1 else x


def _batch(v: str):
    return v if v.startswith("auto") else int(v)


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="benchmark a run's finished stages (lm-eval) and record the results")
    p.add_argument("run_id")
    p.add_argument("--stage", action="append", metavar="NAME",
                   help="stage(s) to evaluate, comma-separated or repeated; base-model = the starting model "
                        "(default: every finished stage)")
    p.add_argument("--tasks", metavar="T1,T2", help="lm-eval task names (default: the preset's benchmarks)")
    p.add_argument("--include-path", action="append", metavar="DIR",
                   help="a folder of task YAMLs (repeatable; builtin:cpt-local = the demo's local set)")
    p.add_argument("--num-fewshot", metavar="K", help="K for every task, or JSON {\"task\": K}")
    p.add_argument("--limit", type=_limit, metavar="N", help="examples per task (a fraction if < 1)")
    p.add_argument("--batch-size", type=_batch, metavar="B", help="an int or auto (default: the preset's, or 8)")
    p.add_argument("--device", metavar="DEV", help="cpu, cuda, cuda:N (default: cuda when there is a GPU)")
    p.add_argument("--json", action="store_true", help="print the recorded rows as JSON instead of the table")


def cmd_eval(a) -> int:
    from cpt_tui import benchmarks as B
    from cpt_tui.store import Store
    from engine.layout import RunLayout
    from engine.spec import BASE_MODEL, BenchmarksSpec, PresetError, load_preset

    ro, run = run_row(a)
    layout = RunLayout(run["run_dir"])
    try:
        preset = load_preset(layout.preset)
    except PresetError as e:
        raise Invalid(str(e)) from None
    settings = _settings(a, preset)
    stages = ro.stages(run["id"])
    names = [s["name"] for s in stages]
    wanted = [n.strip() for arg in (a.stage or []) for n in arg.split(",") if n.strip()]
    if not wanted:
        wanted = [s["name"] for s in stages if s["status"] == "done"]
        if not wanted:
            raise Invalid(f"run {run['id']}: no stage is done yet (evaluate the start with --stage {BASE_MODEL})")
    targets = []
    for n in wanted:
        if n == BASE_MODEL:
            if not layout.prepared.exists():
                raise Invalid(f"run {run['id']}: not prepared yet, so it has no base model to evaluate")
            targets.append((n, json.loads(layout.prepared.read_text())["model_dir"]))
            continue
        if n not in names:
            raise Invalid(f"--stage {n}: no such stage in run {run['id']} (stages: {', '.join(names)}, {BASE_MODEL})")
        row = stages[names.index(n)]
        final = layout.stage(n).final
        if row["status"] != "done" or not (final / "config.json").exists():
            raise Invalid(f"--stage {n}: the stage is {row['status']}; only a finished stage's export "
                          f"({final}) can be evaluated")
        targets.append((n, str(final)))
    spec = BenchmarksSpec(tasks=settings.tasks, include_path=[p for p in settings.include_path])
    unknown, problem = B.unknown_tasks(spec)
    if problem or unknown:
        raise Invalid(problem or f"--tasks: unknown lm-eval task {unknown[0]!r}" +
                      (f" (also: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""))
    ro.close()
    failed = 0
    with Store(paths.db_path(a.db)) as store:
        for target, model_dir in targets:
            t0 = time.time()
            print(f"evaluating {target} ({model_dir}): {', '.join(settings.tasks)}", file=sys.stderr, flush=True)
            doc = B.evaluate(layout, target, model_dir, settings)
            B.record(store, run["id"], target, doc)
            failed += sum(t["status"] != "ok" for t in doc.get("tasks", []))
            print(f"  {target}: {B.summary(doc)} ({time.time() - t0:.0f}s wall; log "
                  f"{layout.benchmark(target).log})", file=sys.stderr, flush=True)
        rows = store.benchmarks(run["id"])
        evals = store.evals(run["id"])
    if a.json:
        print(json.dumps([dict(r) for r in rows], indent=1))
    else:
        print(B.format_table(B.forgetting_table(rows, names, evals), color=sys.stdout.isatty()))
    return EXIT_FAILED if failed else 0
