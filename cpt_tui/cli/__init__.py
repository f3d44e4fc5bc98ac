"""The `cpt-tui` command. Exit codes: 0 ok, 1 a run failed, 2 invalid input (preset, paths, arguments,
a node failing preflight: any engine.errors.UserError), 130 interrupted (Ctrl-C: the run was stopped,
or detached without a terminal).

Never imports torch: heavy work happens in engine subprocesses. Runs belong to their detached
supervisor (cpt_tui/supervisor.py); `--run` and `attach` only follow the database. Each command is a
`cmd_*(args) -> int` in a module of this package, found through COMMANDS and imported only when run.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cpt_tui.cli.common import EXIT_INVALID
from engine.errors import UserError

# command → "module:function" under cpt_tui.cli ("run": --run PRESET; "ui": no command)
COMMANDS = {
    "run": "runs:cmd_run", "attach": "runs:cmd_attach", "stop": "runs:cmd_stop", "resume": "runs:cmd_resume",
    "logs": "runs:cmd_logs", "runs": "runs:cmd_runs", "show": "runs:cmd_show", "ui": "runs:cmd_ui",
    "plan": "plan:cmd_plan", "prep": "prep:cmd_prep", "vocab": "vocab:cmd_vocab", "doctor": "doctor:cmd_doctor",
    "eval": "evaluate:cmd_eval",
    "presets": "presets_cmd:cmd_presets", "serve": "serve:cmd_serve",
}
UI_EXTRA = ("textual", "textual_plot", "textual_hires_canvas", "ruamel", "rich", "textual_serve")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cpt-tui", description="Continual-pretraining run manager.")
    ap.add_argument("--run", metavar="PRESET", help="run a preset headless (a name, see `cpt-tui presets`, or a path)")
    ap.add_argument("--db", metavar="PATH", help="SQLite database (default: $CPT_TUI_DB or the user data dir)")
    ap.add_argument("--detach", action="store_true", help="with --run: start the run and return at once (prints its id)")
    ap.add_argument("--max-restarts", type=int, metavar="N", help="with --run: restarts of a crashed stage (default 3)")
    ap.add_argument("--restart-backoff", type=float, metavar="S",
                    help="with --run: seconds before the first restart, doubled each time (default 10)")
    ap.add_argument("--notify", action="append", metavar="URL", help="with --run: an apprise URL to notify "
                    "(stage done, run done/failed/stopped, NaN, loss spike, restart limit); repeatable")
    ap.add_argument("--telemetry-interval", type=float, metavar="S",
                    help="with --run: seconds between node telemetry samples, 0 = off (default 2)")
    ap.add_argument("--from-stage", metavar="NAME", help="with --run: run the plan from this stage (the stages "
                    "before it are skipped)")
    ap.add_argument("--init-from", metavar="RUN[:STAGE]|DIR", help="with --from-stage: start it from the final "
                    "model of a finished stage of an earlier run (default STAGE: the one before NAME) or a directory")
    sub = ap.add_subparsers(dest="cmd")
    common = argparse.ArgumentParser(add_help=False)  # so `cpt-tui runs --db X` works too
    common.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS)
    _add = sub.add_parser
    sub.add_parser = lambda *a, **k: _add(*a, parents=[common], **k)
    p = sub.add_parser("plan", help="validate a preset and print its resolved plan")
    p.add_argument("preset")
    p.add_argument("--json", action="store_true")
    p.add_argument("--commands", action="store_true", help="also print the exact launch commands (dry run)")
    p = sub.add_parser("doctor", help="per node: GPUs seen by torch and NVML, CUDA/NCCL, driver, memory, the "
                       "device the trainer will use (README: GPU readiness)")
    p.add_argument("preset", nargs="?", help="a preset whose cluster to probe (default: this machine)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=60, help="seconds per node (default 60)")
    p = sub.add_parser("prep", help="prepare a preset's data (tokenize, pack, shards) with a progress bar")
    p.add_argument("preset")
    p.add_argument("--workers", type=int, metavar="N", help="tokenizer processes (default: one per core)")
    p = sub.add_parser("presets", help="list the presets a name can refer to (user and shipped)")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("serve", help="the UI in a browser (textual-serve), on loopback unless --public")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8566, help="port (default 8566)")
    p.add_argument("--public", action="store_true", help="allow a non-loopback --host (anyone who reaches it "
                   "controls your runs: there is no authentication)")
    p = sub.add_parser("runs", help="list runs")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("vocab", help="only the vocabulary extension of a preset; print its report")
    p.add_argument("preset")
    p.add_argument("--out", metavar="DIR", help="work directory (default: a new one under the cpt-tui home)")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("show", help="show one run")
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true")
    from cpt_tui.cli.evaluate import add_parser as add_eval
    add_eval(sub)
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


def command(name: str):
    module, func = COMMANDS[name].split(":")
    return getattr(importlib.import_module(f"cpt_tui.cli.{module}"), func)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return command("run" if a.run else a.cmd or "ui")(a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in UI_EXTRA:
            raise
        print(f"error: {e.name} is not installed: the terminal UI needs the ui extra "
              "(pip install 'cpt-tui[ui]'; `cpt-tui serve` also needs 'cpt-tui[serve]')", file=sys.stderr)
        return EXIT_INVALID
