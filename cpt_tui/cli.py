"""The `cpt-tui` command. Exit codes: 0 ok, 1 a run failed, 2 invalid input (preset, paths, arguments,
a node failing preflight), 130 interrupted (Ctrl-C: the run was stopped, or detached without a terminal).

Never imports torch: heavy work happens in engine subprocesses. Runs belong to their detached
supervisor (cpt_tui/supervisor.py); `--run` and `attach` only follow the database.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from cpt_tui import paths

from cpt_tui.presets import Invalid, load_checked  # noqa: F401  (Invalid, load_checked: public here too)

EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 1, 2, 130


def _fmt_num(x, nd=3):
    if x is None:
        return "-"
    return f"{x:.{nd}f}" if isinstance(x, float) else f"{x:,}"


def cmd_plan(a) -> int:
    from engine.plan import format_plan

    path, preset, plan = load_checked(a.preset, check_paths=False)
    from cpt_tui.prep_cmd import plan_with_cache
    plan = plan_with_cache(preset, plan)  # epochs per source once the data is prepared
    if a.commands:
        from cpt_tui import launch
        plan["commands"] = {}
        for st in preset.stages:
            try:  # a dry run: nothing is written (the DeepSpeed config is only named)
                cmds = launch.build_commands(preset.cluster, st, f"<run_dir>/stages/{st.name}/stage.json", "<run_dir>",
                                             write_configs=False)
            except launch.LaunchError as e:
                raise Invalid(f"{path}: cluster: {e}") from None
            plan["commands"][st.name] = launch.format_commands(cmds)
    if a.json:
        print(json.dumps(plan, indent=1))
    else:
        print(format_plan(plan))
        for name, text in plan.get("commands", {}).items():
            print(f"\ncommands for stage {name}:\n{text}")
    return 0


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
        elif t == "progress" and r.get("message"):
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
        print(f"run {run_id} done; final model: {Path(row['run_dir']) / 'stages' / plan['stages'][-1]['name'] / 'final'}")
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
    run_id = S.start_detached(a.run, db, **_run_options(a))
    if a.detach:
        print(run_id)
        return 0
    from cpt_tui.store import Store
    row = Store(db, readonly=True).run(run_id)
    print(f"run {run_id}  ({row['run_dir']})", flush=True)
    return follow(db, run_id)


def _run_row(a, store=None):
    store = store or _open_store_ro(a)
    run = store.run(a.run_id) if store else None
    if run is None:
        raise Invalid(f"{a.run_id}: no such run (see `cpt-tui runs`)")
    return store, run


def cmd_attach(a) -> int:
    from cpt_tui import lifecycle as S

    S.adopt_orphans(paths.db_path(a.db))
    store, run = _run_row(a)
    # Recent history first, so attaching shows where the run is.
    row = store.db.execute("SELECT rowid FROM events WHERE run_id = ? ORDER BY rowid DESC LIMIT 1 OFFSET ?",
                           [run["id"], max(0, a.history)]).fetchone()
    print(f"run {run['id']}  ({run['run_dir']})  status {run['status']}", flush=True)
    return follow(paths.db_path(a.db), run["id"], row[0] if row else 0)


def cmd_stop(a) -> int:
    from cpt_tui import lifecycle as S
    from cpt_tui.store import TERMINAL, Store

    _, run = _run_row(a)
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

    _, run = _run_row(a)
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

    store, run = _run_row(a)
    run_dir = Path(run["run_dir"])

    def files() -> list[Path]:
        out = [run_dir / "supervisor.log", run_dir / "prepare.log"]
        out += [run_dir / "stages" / s["name"] / "train.log" for s in store.stages(run["id"])]
        return [p for p in out if p.exists()]

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


def _open_store_ro(a):
    from cpt_tui.store import Store

    p = paths.db_path(a.db)
    if not p.exists():
        return None
    return Store(p, readonly=True)


def cmd_runs(a) -> int:
    from cpt_tui import lifecycle as S

    S.adopt_orphans(paths.db_path(a.db))
    store = _open_store_ro(a)
    runs = store.runs() if store else []
    for r in runs:
        r.pop("plan", None)
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
        print(f"{r['id']:<40} {r['status']:<9} {st:>6} {_fmt_num(r['last_loss']):>8} "
              f"{_fmt_num(r['last_tps'], 0):>9}  {started}")
    return 0


def cmd_show(a) -> int:
    store = _open_store_ro(a)
    run = store.run(a.run_id) if store else None
    if run is None:
        raise Invalid(f"{a.run_id}: no such run (see `cpt-tui runs`)")
    stages = store.stages(run["id"])
    evals = store.evals(run["id"])
    if a.json:
        run["plan"] = json.loads(run["plan"]) if run["plan"] else None
        print(json.dumps({"run": run, "stages": stages, "eval": evals,
                          "metrics": len(store.metrics(run["id"]))}, indent=1))
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
              f"  tokens {_fmt_num(s['tokens'] or 0)}" + (f"  restarts {s['restarts']}" if s.get("restarts") else ""))
        last = {}
        for e in evals:
            if e["stage"] == s["name"]:
                last[e["domain"]] = e["loss"]
        if last:
            print("      validation: " + "  ".join(f"{d} {l:.4f}" for d, l in last.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cpt-tui", description="Continual-pretraining run manager.")
    ap.add_argument("--run", metavar="PRESET", help="run a preset headless (a name under presets/ or a path)")
    ap.add_argument("--db", metavar="PATH", help="SQLite database (default: $CPT_TUI_DB or the user data dir)")
    ap.add_argument("--detach", action="store_true", help="with --run: start the run and return at once (prints its id)")
    ap.add_argument("--max-restarts", type=int, metavar="N", help="with --run: restarts of a crashed stage (default 3)")
    ap.add_argument("--restart-backoff", type=float, metavar="S",
                    help="with --run: seconds before the first restart, doubled each time (default 10)")
    ap.add_argument("--telemetry-interval", type=float, metavar="S",
                    help="with --run: seconds between node telemetry samples, 0 = off (default 2)")
    sub = ap.add_subparsers(dest="cmd")
    common = argparse.ArgumentParser(add_help=False)  # so `cpt-tui runs --db X` works too
    common.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS)
    _add = sub.add_parser
    sub.add_parser = lambda *a, **k: _add(*a, parents=[common], **k)
    p = sub.add_parser("plan", help="validate a preset and print its resolved plan")
    p.add_argument("preset")
    p.add_argument("--json", action="store_true")
    p.add_argument("--commands", action="store_true", help="also print the exact launch commands (dry run)")
    p = sub.add_parser("prep", help="prepare a preset's data (tokenize, pack, shards) with a progress bar")
    p.add_argument("preset")
    p.add_argument("--workers", type=int, metavar="N", help="tokenizer processes (default: one per core)")
    p = sub.add_parser("runs", help="list runs")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("vocab", help="only the vocabulary extension of a preset; print its report")
    p.add_argument("preset")
    p.add_argument("--out", metavar="DIR", help="work directory (default: a new one under the cpt-tui home)")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("show", help="show one run")
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("attach", help="follow a run's progress (Ctrl-C: stop it or detach)")
    p.add_argument("run_id")
    p.add_argument("--history", type=int, default=20, metavar="N", help="events shown first (default 20)")
    p = sub.add_parser("stop", help="stop a run gracefully (the trainer checkpoints first)")
    p.add_argument("run_id")
    p.add_argument("--no-wait", action="store_true", help="return once the stop is requested")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for the stop (default 900)")
    p = sub.add_parser("resume", help="continue a stopped or failed run, or re-adopt one whose supervisor died")
    p.add_argument("run_id")
    p = sub.add_parser("logs", help="print a run's process logs")
    p.add_argument("run_id")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.run:
            return cmd_run(a)
        if a.cmd == "plan":
            return cmd_plan(a)
        if a.cmd == "runs":
            return cmd_runs(a)
        if a.cmd == "show":
            return cmd_show(a)
        if a.cmd == "prep":
            from cpt_tui.prep_cmd import cmd_prep
            return cmd_prep(a)
        if a.cmd == "vocab":
            from cpt_tui.vocab_cmd import cmd_vocab
            return cmd_vocab(a, load_checked)
        commands = {"attach": cmd_attach, "stop": cmd_stop, "resume": cmd_resume, "logs": cmd_logs}
        if a.cmd in commands:
            return commands[a.cmd](a)
        from cpt_tui import lifecycle as S
        from cpt_tui.ui.app import run_app
        S.adopt_orphans(paths.db_path(a.db))  # runs whose supervisor died get a new one
        return run_app(paths.db_path(a.db))
    except Invalid as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
