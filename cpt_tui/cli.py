"""The `cpt-tui` command. Exit codes: 0 ok, 1 a run failed, 2 invalid input (preset, paths, arguments).

Never imports torch: heavy work happens in engine subprocesses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cpt_tui import paths

EXIT_FAILED, EXIT_INVALID = 1, 2


class Invalid(Exception):
    """Invalid input: the message is complete and user-facing."""


def load_checked(name: str, check_paths: bool):
    """Find, validate and resolve a preset; raise Invalid naming file, YAML path and line."""
    from engine.plan import PlanError, missing_paths, resolve
    from engine.spec import PresetError, load_preset, preset_error_at

    try:
        path = paths.find_preset(name)
    except FileNotFoundError:
        known = ", ".join(p.stem for p in paths.list_presets())
        raise Invalid(f"{name}: no such preset file, and not a preset name (known: {known})") from None
    try:
        preset = load_preset(path)
        plan = resolve(preset)
    except PresetError as e:
        raise Invalid(str(e)) from None
    except PlanError as e:
        raise Invalid(str(preset_error_at(path, e.yaml_path, e.msg))) from None
    if check_paths:
        missing = missing_paths(preset)
        if missing:
            yp, msg = missing[0]
            raise Invalid(str(preset_error_at(path, yp, msg)) + "\n  (fix this path; nothing was started)")
    return path, preset, plan


def _fmt_num(x, nd=3):
    if x is None:
        return "-"
    return f"{x:.{nd}f}" if isinstance(x, float) else f"{x:,}"


def cmd_plan(a) -> int:
    from engine.plan import format_plan

    path, preset, plan = load_checked(a.preset, check_paths=False)
    if a.commands:
        from cpt_tui import launch
        plan["commands"] = {}
        for st in preset.stages:
            cmds = launch.build_commands(preset.cluster, st, f"<run_dir>/stages/{st.name}/stage.json", "<run_dir>")
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


def cmd_run(a) -> int:
    from cpt_tui.store import Store
    from cpt_tui.supervisor import Supervisor

    path, preset, _ = load_checked(a.run, check_paths=True)
    store = Store(paths.db_path(a.db))
    sup = Supervisor.create(store, path, preset, on_event=_progress_printer())
    print(f"run {sup.run_id}  ({sup.run_dir})", flush=True)
    code = sup.run()
    row = store.run(sup.run_id)
    if code == 0:
        print(f"run {sup.run_id} done; final model: {sup.run_dir / 'stages' / preset.stages[-1].name / 'final'}")
    else:
        print(f"run {sup.run_id} failed: {row['error']}", file=sys.stderr)
    return EXIT_FAILED if code else 0


def _open_store_ro(a):
    from cpt_tui.store import Store

    p = paths.db_path(a.db)
    if not p.exists():
        return None
    return Store(p, readonly=True)


def cmd_runs(a) -> int:
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
    print(f"run {run['id']}  preset {run['preset']}  status {run['status']}")
    print(f"dir {run['run_dir']}")
    if run["error"]:
        print(f"error: {run['error']}")
    for s in stages:
        print(f"  [{s['idx'] + 1}] {s['name']:<20} {s['status']:<8} step {s['step'] or 0}/{s['steps_total'] or '?'}"
              f"  tokens {_fmt_num(s['tokens'] or 0)}")
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
    sub = ap.add_subparsers(dest="cmd")
    common = argparse.ArgumentParser(add_help=False)  # so `cpt-tui runs --db X` works too
    common.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS)
    _add = sub.add_parser
    sub.add_parser = lambda *a, **k: _add(*a, parents=[common], **k)
    p = sub.add_parser("plan", help="validate a preset and print its resolved plan")
    p.add_argument("preset")
    p.add_argument("--json", action="store_true")
    p.add_argument("--commands", action="store_true", help="also print the exact launch commands (dry run)")
    p = sub.add_parser("runs", help="list runs")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("show", help="show one run")
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true")
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
        from cpt_tui.ui.app import run_app
        return run_app(paths.db_path(a.db))
    except Invalid as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
