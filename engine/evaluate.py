"""Benchmarks with lm-eval (EleutherAI's lm-evaluation-harness), in a process of their own.

    python -m engine.evaluate --model DIR --out RESULTS.json --tasks a,b [--include-path DIR ...]
        [--num-fewshot K | --num-fewshot '{"task": K, ...}'] [--limit N] [--batch-size B]
        [--device cpu|cuda] [--dtype auto|float32|bfloat16|float16] [--max-length N]
        [--events EVENTS.jsonl --stage NAME] [--check-only]
    python -m engine.evaluate --list-tasks [--include-path DIR ...]   every known name, as JSON
    accelerate launch -m engine.evaluate ...      data parallel over the GPUs (lm-eval's HFLM does it)

Exit status: 0 when RESULTS.json was written (even if some tasks failed: each carries its own status),
2 for a usage error or a task name lm-eval does not know (`--check-only` stops there), 1 when the model
itself cannot be loaded (RESULTS.json is still written, every task failed with that reason).

How: the model is loaded once (lm_eval.models.huggingface.HFLM, pretrained=DIR). Each requested task is
then *built* on its own (TaskManager.load: that is where lm-eval reads the YAML and loads the dataset),
so a missing dataset or a bad YAML fails that task only. The tasks that built are evaluated together in
ONE lm_eval.simple_evaluate call — the same call, with the same defaults (seeds, bootstrap_iters,
batching of all tasks' requests together), that the `lm_eval` CLI makes, so the numbers are the CLI's.
If that call raises, each task is retried alone so the failure lands on the task that caused it.

RESULTS.json:
  {"model": DIR, "lm_eval_version": str, "seconds": float, "error": str|null,
   "settings": {"tasks", "include_path", "num_fewshot", "limit", "batch_size", "device", "dtype", "max_length"},
   "tasks": [{"task", "requested" (the name asked for: differs for a group's members), "status": "ok"|"failed",
              "reason": str|null, "n_shot": int|null, "limit": number|null, "n_samples": int|null,
              "metrics": [{"metric", "value", "stderr", "higher_is_better"}]}]}
  `metric` is lm-eval's metric name, with ",FILTER" appended when the filter is not "none"
  (gsm8k: "exact_match,strict-match"); `stderr` is null where lm-eval computed none.

Offline: HF_HUB_OFFLINE and HF_DATASETS_OFFLINE default to 1 here (set them to 0 to let lm-eval download).
Only this module and engine/benchmarks import lm_eval; the manager runs it as a subprocess.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

USAGE_EXIT, MODEL_EXIT = 2, 1
REASON_MAX = 2000


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _include_list(include_path) -> list[str] | None:
    if not include_path:
        return None
    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
    return [str(Path(p).expanduser().resolve()) for p in paths]


def task_manager(include_path=None, metadata: dict | None = None, include_defaults: bool = True):
    """lm-eval's TaskManager over its built-in tasks and `include_path` (one folder or a list)."""
    _offline()
    from lm_eval.tasks import TaskManager

    paths = _include_list(include_path)
    for p in paths or ():
        if not Path(p).is_dir():
            raise FileNotFoundError(f"include path {p} is not a directory")
    return TaskManager(include_path=paths, include_defaults=include_defaults, metadata=metadata or {})


def check_tasks(names, include_path=None, manager=None) -> list[str]:
    """The names lm-eval's task registry does not know (tasks, groups and tags, built-in or under
    `include_path`). Offline: only YAML files are indexed, no dataset is opened."""
    tm = manager or task_manager(include_path)
    known = set(tm.all_tasks)
    return [n for n in names if n not in known]


def _manager_for(tasks, include_path, metadata):
    """A TaskManager that knows `tasks`. When all of them are plain tasks (not groups or tags, which may
    gather built-in tasks) of the include path, only it is indexed — the demo's local tasks: indexing
    lm-eval's ~15,000 built-in YAMLs costs 5-15 s of CPU. The include path wins over a built-in task
    of the same name either way, as in lm-eval's CLI."""
    if include_path:
        try:
            from lm_eval.tasks._index import Kind  # lm-eval 0.4.10+

            local = task_manager(include_path, metadata=metadata, include_defaults=False)
            index = local.task_index
            if all(t in index and index[t].kind == Kind.TASK for t in tasks):
                return local
        except ImportError:
            pass
    return task_manager(include_path, metadata=metadata)


def parse_fewshot(value: str | None, tasks: list[str]) -> tuple[int | None, dict[str, int]]:
    """`--num-fewshot`: an int for every task, or a JSON object {task: K} (tasks not named keep the
    YAML's default). Returns (global, per_task)."""
    if value is None or value == "":
        return None, {}
    v = value.strip()
    if v.startswith("{"):
        m = json.loads(v)
        bad = [k for k in m if k not in tasks]
        if bad:
            raise ValueError(f"--num-fewshot names tasks not in --tasks: {', '.join(bad)}")
        if any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in m.values()):
            raise ValueError("--num-fewshot values must be integers >= 0")
        return None, dict(m)
    k = int(v)
    if k < 0:
        raise ValueError("--num-fewshot must be >= 0")
    return k, {}


def _reason(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip()
    if "OfflineModeIsEnabled" in msg or "offline mode" in msg.lower():
        msg += (" — the dataset is not in the local Hugging Face cache; download it beforehand "
                "(HF_DATASETS_CACHE) or run with HF_DATASETS_OFFLINE=0")
    return msg if len(msg) <= REASON_MAX else msg[:REASON_MAX] + " …"


def _num(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _metrics(task_res: dict, hib: dict) -> list[dict]:
    out = []
    for key, value in task_res.items():
        if "," not in key or "_stderr," in key:
            continue
        name, filt = key.split(",", 1)
        if _num(value) is None and value is not None:
            continue
        out.append({"metric": name if filt == "none" else f"{name},{filt}", "value": _num(value),
                    "stderr": _num(task_res.get(f"{name}_stderr,{filt}")), "higher_is_better": hib.get(name)})
    return out


def _build(tm, spec: str, fewshot: int | None):
    """Build one requested task/group/tag: (objects to evaluate, leaf+group names). Raises on failure."""
    loaded = tm.load([spec])
    groups, tasks = loaded.get("groups") or {}, loaded["tasks"]
    if not tasks:
        raise ValueError(f"{spec} has no tasks")
    if fewshot is not None:
        # A per-task value: set on every leaf, as lm-eval's global --num_fewshot would (which, like
        # lm-eval, we do not apply over a YAML's explicit num_fewshot: 0).
        for t in tasks.values():
            if t.get_config("num_fewshot") != 0:
                t.set_config(key="num_fewshot", value=fewshot)
    objs = [groups[spec]] if spec in groups else list(tasks.values())
    return objs, list(groups) + list(tasks)


def _evaluate(lm, tm, objs, args, num_fewshot):
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=objs, num_fewshot=num_fewshot, batch_size=args.batch_size,
                           limit=args.limit, task_manager=tm, bootstrap_iters=args.bootstrap_iters)


def model_args(args) -> dict:
    m = {"pretrained": str(args.model), "dtype": args.dtype}
    if args.max_length:
        m["max_length"] = args.max_length
    return m


def run(args, tm=None) -> tuple[dict | None, int]:
    """Evaluate; returns (RESULTS document, exit status). `tm`: a TaskManager already built with the
    same include path (building one indexes every lm-eval YAML: ~5-15 s)."""
    _offline()
    t0 = time.time()
    import lm_eval

    tasks = list(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))
    global_k, per_task_k = parse_fewshot(args.num_fewshot, tasks)
    doc = {"model": str(args.model), "lm_eval_version": getattr(lm_eval, "__version__", None), "seconds": None,
           "error": None,
           "settings": {"tasks": tasks, "include_path": _include_list(args.include_path), "num_fewshot":
                        per_task_k or global_k, "limit": args.limit, "batch_size": args.batch_size,
                        "device": args.device, "dtype": args.dtype, "max_length": args.max_length},
           "tasks": []}
    entries: dict[str, list[dict]] = {}

    def failed(spec, reason, names=None):
        entries[spec] = [{"task": n, "requested": spec, "status": "failed", "reason": reason, "n_shot": None,
                          "limit": args.limit, "n_samples": None, "metrics": []} for n in (names or [spec])]

    try:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=str(args.model), device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                  max_length=args.max_length or None)
    except Exception as e:  # the model: nothing can run
        traceback.print_exc()
        doc["error"] = f"model {args.model} could not be loaded: {_reason(e)}"
        for s in tasks:
            failed(s, doc["error"])
        doc["tasks"] = [e for s in tasks for e in entries[s]]
        doc["seconds"] = round(time.time() - t0, 3)
        return doc, MODEL_EXIT

    tm = tm or task_manager(args.include_path, metadata=model_args(args))
    built: dict[str, tuple[list, list[str]]] = {}
    for spec in tasks:
        try:
            built[spec] = _build(tm, spec, per_task_k.get(spec))
        except Exception as e:
            print(f"engine.evaluate: task {spec} failed to load: {_reason(e)}", file=sys.stderr, flush=True)
            failed(spec, _reason(e))

    def collect(res, spec, names):
        out = []
        results, hib = res.get("results", {}), res.get("higher_is_better", {})
        for n in names:
            if n not in results:
                continue  # a group without aggregate metrics
            ns = res.get("n-samples", {}).get(n) or {}
            out.append({"task": n, "requested": spec, "status": "ok", "reason": None,
                        "n_shot": res.get("n-shot", {}).get(n), "limit": args.limit,
                        "n_samples": ns.get("effective"), "metrics": _metrics(results[n], hib.get(n, {}))})
        entries[spec] = out or [{"task": spec, "requested": spec, "status": "failed", "n_shot": None,
                                 "reason": "lm-eval returned no results", "limit": args.limit,
                                 "n_samples": None, "metrics": []}]

    if built:
        try:
            res = _evaluate(lm, tm, [o for objs, _ in built.values() for o in objs], args, global_k)
            if res is not None:  # None on the non-zero ranks of a data-parallel launch
                for spec, (_, names) in built.items():
                    collect(res, spec, names)
            else:
                doc = None
        except Exception as e:
            print(f"engine.evaluate: evaluating the tasks together failed ({_reason(e)}); "
                  "retrying each task alone", file=sys.stderr, flush=True)
            traceback.print_exc()
            for spec in built:
                try:
                    objs, names = _build(tm, spec, per_task_k.get(spec))  # fresh task objects
                    res = _evaluate(lm, tm, objs, args, global_k)
                    if res is None:
                        doc = None
                        continue
                    collect(res, spec, names)
                except Exception as e2:
                    traceback.print_exc()
                    failed(spec, _reason(e2))
    if doc is None:
        return None, 0
    doc["tasks"] = [e for s in tasks for e in entries.get(s, [])]
    doc["seconds"] = round(time.time() - t0, 3)
    return doc, 0


# ----------------------------------------------------------------------------- events

# The `benchmark` event (engine/events.py SCHEMA): one per result row of this process's output.
def emit_events(writer, doc: dict) -> int:
    """One `benchmark` event per metric of an ok task, one per failed task. Returns how many."""
    n = 0
    for t in doc["tasks"]:
        base = {"task": t["task"], "requested": t["requested"], "status": t["status"], "model": doc["model"]}
        if t["status"] != "ok":
            writer.emit("benchmark", **base, reason=t["reason"] or "")
            n += 1
            continue
        for m in t["metrics"]:
            writer.emit("benchmark", **base, metric=m["metric"], value=m["value"], stderr=m["stderr"],
                        n_shot=t["n_shot"], limit=t["limit"], n_samples=t["n_samples"])
            n += 1
    return n


# ----------------------------------------------------------------------------- CLI

def _limit(s: str):
    v = float(s)
    return int(v) if v >= 1 and v.is_integer() else v


def _batch(s: str):
    return s if s.startswith("auto") else int(s)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a local Hugging Face model directory (with its tokenizer)")
    p.add_argument("--out", help="where to write RESULTS.json")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval task, group or tag names")
    p.add_argument("--include-path", action="append", default=[], help="a folder of task YAMLs (repeatable)")
    p.add_argument("--num-fewshot", default=None, help="K for every task, or JSON {task: K}")
    p.add_argument("--limit", type=_limit, default=None, help="examples per task (a fraction if < 1)")
    p.add_argument("--batch-size", type=_batch, default=1, help="an int, or auto / auto:N")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (the model's own), float32, bfloat16, float16")
    p.add_argument("--max-length", type=int, default=None,
                   help="context length (default: the model's max_position_embeddings)")
    p.add_argument("--bootstrap-iters", type=int, default=100000, help="lm-eval's default; 0 = no stderr")
    p.add_argument("--events", default=None, help="append `benchmark` events to this events.jsonl")
    p.add_argument("--stage", default=None, help="the stage name of those events")
    p.add_argument("--check-only", action="store_true", help="only check the task names, then exit")
    p.add_argument("--list-tasks", action="store_true",
                   help="print every name lm-eval knows (built-in and under --include-path) as JSON, then exit")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.list_tasks:  # the manager caches this to check preset task names without lm-eval in-process
        print(json.dumps(sorted(task_manager(args.include_path).all_tasks)))
        return 0
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        print("engine.evaluate: --tasks names no task", file=sys.stderr)
        return USAGE_EXIT
    try:
        parse_fewshot(args.num_fewshot, tasks)
        tm = _manager_for(tasks, args.include_path, None if args.check_only else model_args(args))
        unknown = check_tasks(tasks, manager=tm)
    except (ValueError, FileNotFoundError) as e:
        print(f"engine.evaluate: {e}", file=sys.stderr)
        return USAGE_EXIT
    if unknown:
        print(f"engine.evaluate: unknown lm-eval task{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}"
              + (f" (include path: {', '.join(_include_list(args.include_path))})" if args.include_path else ""),
              file=sys.stderr)
        return USAGE_EXIT
    if args.check_only:
        print(f"engine.evaluate: {len(tasks)} task name(s) known to lm-eval")
        return 0
    if not args.model or not args.out:
        print("engine.evaluate: --model and --out are required (unless --check-only)", file=sys.stderr)
        return USAGE_EXIT
    if args.events and not args.stage:
        print("engine.evaluate: --events needs --stage", file=sys.stderr)
        return USAGE_EXIT

    doc, code = run(args, tm)
    if doc is None:  # a non-zero rank of a data-parallel launch: rank 0 writes
        return code
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out)
    if args.events:
        from engine.events import EventWriter

        w = EventWriter(args.events, args.stage)
        try:
            emit_events(w, doc)
        finally:
            w.close()
    ok = sum(t["status"] == "ok" for t in doc["tasks"])
    print(f"engine.evaluate: {ok}/{len(doc['tasks'])} task(s) ok in {doc['seconds']:.1f}s -> {out}", flush=True)
    for t in doc["tasks"]:
        if t["status"] != "ok":
            print(f"engine.evaluate: {t['task']} FAILED: {t['reason']}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
