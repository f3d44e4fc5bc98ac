"""The run commands: `--run` and `attach` (follow a run's events), `stop`, `resume`, `logs`, `runs`,
`show`, and the Textual UI (no command). Runs belong to their detached supervisor; these follow the
database and call the lifecycle API.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from cpt_tui import paths
from cpt_tui.cli.common import EXIT_FAILED, EXIT_INTERRUPTED, open_store_ro, run_row
from cpt_tui.fmt import fmt_num
from engine.layout import RunLayout


def _progress_printer():
    def show(r: dict) -> None:
        t = r["type"]
        if t == "metric":
            print(f"[{r['stage']}] step {r['step']}/{r.get('total_steps', '?')}  tokens {r['tokens']:,}  "
                  f"loss {r['loss']:.4f}  lr {r['lr']:.2e}  {r['tokens_per_s']:,.0f} tok/s", flush=True)
        elif t == "eval":
            print(f"[{r['stage']}] eval step {r['step']}  {r['domain']}: {r['loss']:.4f}", flush=True)
        elif t == "status":
            print(f"[{r['stage']}] {r['state']}" + (f": {r['reason']}" if r.get("reason") else ""), flush=True)
        elif t in ("warning", "error"):
            print(f"[{r['stage']}] {t}: {r.get('message')}", flush=True)
        elif t in ("progress", "transfer") and r.get("message"):  # transfer: ssh shared_fs false
            print(f"[{r['stage']}] {r['message']}", flush=True)
    return show


class _Detach(Exception):
    """SIGTERM / SIGHUP to a following CLI (its terminal closed): leave the run alone."""


def _ask_stop_or_detach() -> str:
    """Ctrl-C while following: 'stop' or 'detach'. Without a terminal (scripts, CI): detach."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return "detach"
    try:
        ans = input("\nStop the run (it checkpoints first), or detach and leave it running? [s]top / [D]etach: ")
    except (EOFError, KeyboardInterrupt):
        return "detach"
    return "stop" if ans.strip().lower() in ("s", "stop") else "detach"


def follow(db, run_id: str, since_rowid: int = 0) -> int:
    """Print a run's events as they arrive until it ends (or the user detaches). Exit code: 0 done or
    detached interactively, 1 failed, 130 stopped by this Ctrl-C or detached without a terminal."""
    from cpt_tui import lifecycle as S
    from cpt_tui.store import TERMINAL, Store

    store = Store(db, readonly=True)
    show = _progress_printer()
    rowid, stopping, gone_since = since_rowid, False, None

    def on_signal(signum, frame):
        raise _Detach(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            try:
                for r in store.events_after(run_id, rowid):
                    rowid = r["rowid"]
                    show(r)
                row = store.run(run_id)
                if row["status"] in TERMINAL:
                    for r in store.events_after(run_id, rowid):
                        show(r)
                    break
                if S.supervisor_alive(row):
                    gone_since = None
                elif gone_since is None:
                    gone_since = time.monotonic()
                elif time.monotonic() - gone_since > 5:  # it died: adopt the run (a `cpt-tui` start)
                    print(f"[@run] the supervisor of {run_id} is gone: re-adopting the run", flush=True)
                    S.adopt_orphans(db)
                    gone_since = None
                time.sleep(0.5)
            except KeyboardInterrupt:
                if stopping or _ask_stop_or_detach() == "detach":
                    print(f"\ndetached: run {run_id} continues.  cpt-tui attach {run_id} | cpt-tui logs {run_id} -f | "
                          f"cpt-tui stop {run_id}", file=sys.stderr, flush=True)
                    interactive = sys.stdin.isatty() and sys.stdout.isatty()
                    return 0 if interactive and not stopping else EXIT_INTERRUPTED
                stopping = True
                print(f"stopping run {run_id} (the trainer saves a checkpoint first) ...", flush=True)
                S.request_stop(store, run_id)
    except _Detach as e:
        return 128 + e.args[0]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    row = store.run(run_id)
    store.close()
    if row["status"] == "done":
        plan = json.loads(row["plan"])
        print(f"run {run_id} done; final model: {RunLayout(row['run_dir']).stage(plan['stages'][-1]['name']).final}")
        return 0
    if row["status"] == "stopped":
        print(f"run {run_id} stopped; continue it with  cpt-tui resume {run_id}")
        return EXIT_INTERRUPTED if stopping else 0
    print(f"run {run_id} failed: {row['error']}", file=sys.stderr)
    return EXIT_FAILED


def _run_options(a) -> dict:
    opts = {"max_restarts": a.max_restarts, "backoff": a.restart_backoff, "telemetry_interval": a.telemetry_interval}
    return {k: v for k, v in opts.items() if v is not None}


def cmd_run(a) -> int:
    from cpt_tui import lifecycle as S

    db = paths.db_path(a.db)
    S.adopt_orphans(db)
    from cpt_tui.notify import passed_to_supervisor  # --notify: through its environment, never SQLite

    with passed_to_supervisor(getattr(a, "notify", None)):
        run_id = S.start_detached(a.run, db, from_stage=getattr(a, "from_stage", None),
                                  init_from=getattr(a, "init_from", None), **_run_options(a))
    if a.detach:
        print(run_id)
        return 0
    from cpt_tui.store import Store
    row = Store(db, readonly=True).run(run_id)
    print(f"run {run_id}  ({row['run_dir']})", flush=True)
    return follow(db, run_id)


def cmd_attach(a) -> int:
    from cpt_tui import lifecycle as S

    S.adopt_orphans(paths.db_path(a.db))
    store, run = run_row(a)
    since = store.history_rowid(run["id"], a.history)  # recent history first: where the run is
    print(f"run {run['id']}  ({run['run_dir']})  status {run['status']}", flush=True)
    return follow(paths.db_path(a.db), run["id"], since)


def cmd_stop(a) -> int:
    from cpt_tui import lifecycle as S
    from cpt_tui.store import TERMINAL, Store

    _, run = run_row(a)
    store = Store(paths.db_path(a.db))
    what = S.request_stop(store, run["id"])
    if what == "not running":
        print(f"run {run['id']} is not running ({run['status']})")
        return 0
    if what == "signalled" and not a.no_wait:
        print(f"stopping run {run['id']} (the trainer saves a checkpoint first) ...", flush=True)
        deadline = time.monotonic() + a.timeout
        while store.run(run["id"])["status"] not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.5)
    row = store.run(run["id"])
    print(f"run {run['id']}: {row['status']}")
    return 0 if row["status"] in TERMINAL or a.no_wait else EXIT_FAILED


def cmd_resume(a) -> int:
    from cpt_tui import lifecycle

    _, run = run_row(a)
    try:
        what, run, pid = lifecycle.resume(paths.db_path(a.db), run["id"])
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    if what == "done":
        print(f"run {run['id']} is already done")
    elif what == "supervised":
        print(f"run {run['id']} is supervised (pid {run['pid']} on {run['host']}): nothing to do")
    else:
        print(f"run {run['id']} resumed (supervisor pid {pid}); follow it with  cpt-tui attach {run['id']}")
    return 0


def cmd_logs(a) -> int:
    """The run's process logs (supervisor, data preparation, each stage's trainer); -f follows them."""
    from cpt_tui import lifecycle as S
    from cpt_tui.store import TERMINAL

    store, run = run_row(a)
    layout = RunLayout(run["run_dir"])
    run_dir = layout.root

    def files() -> list[Path]:
        return [p for p in layout.logs([s["name"] for s in store.stages(run["id"])]) if p.exists()]

    pos: dict[Path, int] = {}
    current = None
    try:
        while True:
            for f in files():
                with open(f, "rb") as fh:
                    fh.seek(pos.get(f, 0))
                    data = fh.read()
                if data:
                    if current != f:
                        print(f"==> {f.relative_to(run_dir)} <==", flush=True)
                        current = f
                    sys.stdout.write(data.decode(errors="replace"))
                    sys.stdout.flush()
                    pos[f] = pos.get(f, 0) + len(data)
            if not a.follow:
                return 0
            row = store.run(run["id"])
            if row["status"] in TERMINAL and not S.supervisor_alive(row):
                if all(pos.get(f, 0) == f.stat().st_size for f in files()):
                    return 0
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0


def cmd_runs(a) -> int:
    from cpt_tui import lifecycle as S

    S.adopt_orphans(paths.db_path(a.db))
    store = open_store_ro(a)
    runs = [{k: v for k, v in r.items() if k != "plan"} for r in (store.runs() if store else [])]
    if a.json:
        print(json.dumps(runs, indent=1))
        return 0
    if not runs:
        print("no runs yet: start one with  cpt-tui --run tiny-demo")
        return 0
    print(f"{'run':<40} {'status':<9} {'stage':>6} {'loss':>8} {'tok/s':>9}  started")
    for r in runs:
        st = f"{(r['current_stage'] or 0) + 1}/{r['n_stages']}"
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started"] or r["created"]))
        print(f"{r['id']:<40} {r['status']:<9} {st:>6} {fmt_num(r['last_loss']):>8} "
              f"{fmt_num(r['last_tps'], 0):>9}  {started}")
    return 0


def cmd_show(a) -> int:
    store, run = run_row(a)
    stages = store.stages(run["id"])
    evals = store.evals(run["id"])
    bench = store.benchmarks(run["id"])
    if a.json:
        out = {**run, "plan": json.loads(run["plan"]) if run["plan"] else None}
        opts = json.loads(run["options"] or "{}")
        metrics = store.metrics(run["id"])  # each step once (the latest attempt)
        print(json.dumps({"run": out, "lineage": opts.get("lineage"), "stages": [dict(s) for s in stages],
                          "eval": [dict(e) for e in evals], "metrics": len(metrics),
                          "metric_steps": {s["name"]: [m.step for m in metrics if m.stage == s["name"]] for s in stages},
                          "attempts": store.attempts(run["id"]),
                          "metric_rows_all_attempts": len(store.metrics(run["id"], history=True)),
                          "benchmarks": bench_json(bench)}, indent=1))
        return 0
    from cpt_tui import lifecycle as S
    sup = ""
    if run["status"] == "running":
        sup = f"  supervisor pid {run['pid']}" + ("" if S.supervisor_alive(run) else " (gone: `cpt-tui resume`)")
    print(f"run {run['id']}  preset {run['preset']}  status {run['status']}{sup}")
    print(f"dir {run['run_dir']}")
    if run["error"]:
        print(f"error: {run['error']}")
    for s in stages:
        print(f"  [{s['idx'] + 1}] {s['name']:<20} {s['status']:<8} step {s['step'] or 0}/{s['steps_total'] or '?'}"
              f"  tokens {fmt_num(s['tokens'] or 0)}" + (f"  restarts {s['restarts']}" if s.get("restarts") else ""))
        last = {}
        for e in evals:
            if e["stage"] == s["name"]:
                last[e["domain"]] = e["loss"]
        if last:
            print("      validation: " + "  ".join(f"{d} {l:.4f}" for d, l in last.items()))
    if bench:
        from cpt_tui.benchmarks import format_table, forgetting_table
        print("\nbenchmarks and forgetting (delta vs base-model; validation loss: last per stage):")
        print(format_table(forgetting_table(bench, [s["name"] for s in stages], evals), color=sys.stdout.isatty()))
    return 0


def bench_json(rows) -> list[dict]:
    """`show --json`'s benchmarks: {stage, task, metric, value, stderr} plus n_shot, limit, status, reason."""
    keys = ("stage", "task", "metric", "value", "stderr", "n_shot", "limit", "status", "reason", "higher_is_better")
    return [{k: (r[k] or None) if k == "metric" else r[k] for k in keys} for r in rows]


def cmd_ui(a) -> int:
    from cpt_tui import lifecycle as S
    from cpt_tui.ui.app import run_app

    S.adopt_orphans(paths.db_path(a.db))  # runs whose supervisor died get a new one
    return run_app(paths.db_path(a.db))
