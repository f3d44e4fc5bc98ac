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

import json
import os

from cpt_tui.backends import Backend, LaunchError, NodeCommand, format_commands
from cpt_tui.backends.accelerate import (LAUNCH_MODULE, forced_cpu, free_port, launch_args, stage_deepspeed,
                                         stop_env)
from cpt_tui.backends.shell import check_env
from cpt_tui.procs import GUARD_PLACEHOLDER, Proc, engine_env, guarded, start_kept
from cpt_tui.redact import redact
from engine.gpus import problems
from engine.layout import StageLayout
from engine.plan import PlanError, processes_per_node
from engine.spec import StageSpec


def _with_env(env: dict, argv: Sequence[str]) -> str:
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in redact(env).items())
    return (shown + " " if shown else "") + shlex.join(argv)


class LocalBackend(Backend):
    kind = "local"

    def commands(self, stage: StageSpec, stage_json: str, run_dir: str, *, write_configs: bool = True,
                 module: str = "engine.train", main_process_port: Optional[int] = None) -> list[NodeCommand]:
        cpu = forced_cpu(self.cluster.device) if self.cpu is None else self.cpu
        try:
            total = processes_per_node(self.cluster)  # `auto`: this machine's GPUs (engine/doctor.py)
        except PlanError as e:
            raise LaunchError(str(e)) from None
        ds_path = stage_deepspeed(stage, total, run_dir, cpu=cpu, write=write_configs)
        env = {**stop_env(self.cluster.stop_grace), **check_env(self.cluster.env, "cluster.env")}
        # A free port per stage attempt (commands() is called per attempt) unless the preset fixes one
        port = main_process_port or self.cluster.main_process_port or free_port()
        inner = [self.python, "-m", LAUNCH_MODULE, *launch_args(
            total=total, machines=1, rank=0, main_ip=None, port=port,
            stage=stage, ds_path=ds_path, cpu=cpu, module=module, stage_json=stage_json)]
        argv = guarded(self.python, self.kill_grace, inner)
        display = _with_env(env, [*argv[:2], GUARD_PLACEHOLDER, *argv[3:]])
        return [NodeCommand("local", argv, env, False, 0, inner, None, display)]

    def probe(self, timeout: float = 60) -> dict[str, dict]:
        """`python -m engine.doctor --json` on this machine, with the cluster's env (as the trainer)."""
        env = {**os.environ, **engine_env(), **check_env(self.cluster.env, "cluster.env")}
        try:
            r = subprocess.run([self.python, "-m", "engine.doctor", "--json", "--device", self.cluster.device],
                               capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise LaunchError(f"node local: the probe (python -m engine.doctor) timed out after {timeout:g} s") from None
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode != 0 or not lines:
            why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
            raise LaunchError(f"node local: the probe (python -m engine.doctor) failed: {why}")
        self.reports = {"local": json.loads(lines[-1])}
        return self.reports

    def preflight(self, timeout: float = 10, stages=()) -> None:
        """Probe this machine (engine/doctor.py) when it matters: `device: cuda`, or a bf16/fp16
        stage with `device: auto`. A machine without CUDA then fails (LaunchError, exit 2) unless
        `cluster.device: cpu`; with `processes_per_node: auto`, torch must see the GPUs NVML counted."""
        precisions = {st.precision for st in stages}
        dev = self.cluster.device
        if dev == "cpu" or (dev == "auto" and not precisions & {"bf16", "fp16"}):
            return
        rep = self.probe(max(timeout, 60))["local"]
        bad = problems(rep, dev, precisions)
        if not bad and self.cluster.processes_per_node == "auto" and rep["device"] == "cuda":
            want = processes_per_node(self.cluster)
            if rep["cuda_device_count"] < want:
                bad.append(f"processes_per_node auto: NVML counts {want} GPU(s) but torch sees "
                           f"{rep['cuda_device_count']}; set processes_per_node")
        if bad:
            raise LaunchError("\n".join(f"node local: {b}" for b in bad))

    def describe(self, cmds: Sequence[NodeCommand], *, started: bool = False, attempt: int = 1) -> str:
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
