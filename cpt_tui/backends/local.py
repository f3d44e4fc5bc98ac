"""The local backend: the stage's `accelerate launch` on this machine, under the keeper (see
cpt_tui/procs.py), in its own session, so that training outlives a dead supervisor. A new supervisor
re-attaches to the recorded keepers by (pid, start time) and reads their exit status files.

`commands()` also wraps the launch in the guard (`argv`), for callers that run a local command
directly and want it to end with them (tests, benchmarks); the supervisor runs `launch` under the keeper.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
from dataclasses import replace
from typing import Optional, Sequence

from cpt_tui.backends import Backend, NodeCommand, format_commands
from cpt_tui.backends.accelerate import LAUNCH_MODULE, default_cpu, launch_args, stage_deepspeed
from cpt_tui.backends.shell import check_env
from cpt_tui.procs import GUARD_PLACEHOLDER, Proc, engine_env, guarded, start_kept
from cpt_tui.redact import redact
from engine.layout import StageLayout
from engine.spec import StageSpec


def _with_env(env: dict, argv: Sequence[str]) -> str:
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in redact(env).items())
    return (shown + " " if shown else "") + shlex.join(argv)


class LocalBackend(Backend):
    kind = "local"

    def commands(self, stage: StageSpec, stage_json: str, run_dir: str, *, write_configs: bool = True,
                 module: str = "engine.train", main_process_port: Optional[int] = None) -> list[NodeCommand]:
        cpu = default_cpu() if self.cpu is None else self.cpu
        total = self.cluster.processes_per_node
        ds_path = stage_deepspeed(stage, total, run_dir, cpu=cpu, write=write_configs)
        env = check_env(self.cluster.env, "cluster.env")
        inner = [self.python, "-m", LAUNCH_MODULE, *launch_args(
            total=total, machines=1, rank=0, main_ip=None, port=main_process_port or self.cluster.main_process_port,
            stage=stage, ds_path=ds_path, cpu=cpu, module=module, stage_json=stage_json)]
        argv = guarded(self.python, self.kill_grace, inner)
        display = _with_env(env, [*argv[:2], GUARD_PLACEHOLDER, *argv[3:]])
        return [NodeCommand("local", argv, env, False, 0, inner, None, display)]

    def describe(self, cmds: Sequence[NodeCommand], *, started: bool = False) -> str:
        if not started:
            return format_commands(cmds)
        text = format_commands([replace(c, display="<keeper> " + _with_env(c.env, c.launch)) for c in cmds])
        return text[:text.rindex("# <guard>")] + ("# <keeper>: cpt_tui.procs._KEEPER, which records the exit "
                                                  "status; the trainer outlives the supervisor")

    def start(self, cmds: Sequence[NodeCommand], layout: StageLayout, attempt: int) -> list[Proc]:
        with open(layout.log, "ab") as log:
            return [start_kept(c.launch, str(layout.exit_file(attempt, i)), log, {**engine_env(), **c.env},
                               node=c.node, backend=self.kind) for i, c in enumerate(cmds)]

    def stop(self, procs: Sequence[Proc], *, force: bool = False) -> None:
        for p in procs:
            p.signal(signal.SIGKILL if force else signal.SIGTERM)  # the keeper's group; the keeper ignores it

    def adopt(self, procs: Sequence[Proc], *, sleep, log) -> Optional[list[Proc]]:
        return list(procs) or None  # running or not: their exit status files say how they ended

    def telemetry_commands(self, interval: float = 2.0, *, kill_grace: float = 5.0) -> list[NodeCommand]:
        inner = [self.python, "-m", "engine.telemetry", "--interval", f"{interval:g}", "--node", "local"]
        argv = guarded(self.python, kill_grace, inner)
        return [NodeCommand("local", argv, {}, False, 0, inner, None,
                            shlex.join([*argv[:2], GUARD_PLACEHOLDER, *argv[3:]]))]

    def start_telemetry(self, cmd: NodeCommand, *, stdout=None, stderr=None) -> subprocess.Popen:
        cmd = replace(cmd, env={"PYTHONPATH": engine_env()["PYTHONPATH"]})  # the engine from this checkout
        return super().start_telemetry(cmd, stdout=stdout, stderr=stderr)
