"""Launch backends: where a stage's processes run. The supervisor's state machine talks only to
`Backend`; `backend_for(cluster)` picks the implementation from `cluster.kind`:

- `local` (cpt_tui/backends/local.py): the trainer under the keeper on this machine, in its own
  session; it outlives a dead supervisor and is re-attached by the next one.
- `ssh` (cpt_tui/backends/ssh.py): one `accelerate launch` per node over OpenSSH, each under the
  guard, which ends the node's process tree when the ssh channel closes (no orphans on GPU nodes).
- `slurm` (cpt_tui/backends/slurm.py): one batch job per stage attempt (a generated sbatch script
  that sruns one `accelerate launch` per node); jobs outlive the supervisor and are re-adopted by id.

Everything here builds argv LISTS; nothing is run through a local shell (cpt_tui/backends/shell.py
quotes the one remote command string). The UI process imports this package: it must not import torch.

Adding a backend (e.g. Slurm): subclass `Backend`, implement the abstract methods with the contracts
below, add its `cluster.kind` to `backend_for`. Nothing in the supervisor changes.
"""

from __future__ import annotations

import os
import signal
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

from cpt_tui.procs import GUARD_PLACEHOLDER, Proc, start as start_guarded, terminate
from engine.errors import UserError
from engine.layout import StageLayout
from engine.spec import ClusterSpec, Preset, StageSpec

__all__ = ["Backend", "LaunchError", "NodeCommand", "backend_for", "build_commands", "build_telemetry_commands",
           "dry_run", "format_commands", "preflight"]

PathLike = Union[str, os.PathLike]


class LaunchError(UserError):
    """A user-facing launch problem (message names the node and what to do)."""


@dataclass
class NodeCommand:
    """One process to start on the manager: accelerate locally, or ssh to a node.

    `env`: for a local command, the variables to set on top of the manager's environment; for a
    remote one, what the node's engine gets (already part of `argv`). `launch`: the unwrapped
    `accelerate launch` argv as it runs on the node. `display`: a readable, redacted rendering.
    """

    node: str
    argv: list[str] = field(repr=False)
    env: dict[str, str] = field(repr=False)
    remote: bool
    rank: int = 0
    launch: list[str] = field(default_factory=list, repr=False)
    workdir: Optional[str] = None
    display: str = ""


class Backend(ABC):
    """Where one run's stage processes run. One instance per run, built from the preset's cluster.

    The supervisor drives a stage as: `preflight()`, `commands(...)`, `prepare_stage(layout)`,
    `start(cmds, layout, attempt)` → procs (recorded in SQLite), then every poll tick `poll(procs)`
    while it reads `events_path(layout)`; on a stop request `stop(procs)`, after the stop timeout
    `stop(procs, force=True)`; if one process fails while others run, `abort(procs)`; once all have
    exited, `finish_stage(layout)`. After a supervisor restart it calls `adopt(recorded procs)` first.

    Contracts:
    - `preflight()`: check every node before anything starts (reachable, engine importable, ...);
      raise `LaunchError` listing each failing node on its own line. Called again before each stage.
    - `preflight_disk(preset, plan)`: right after the first preflight, before data preparation: each
      node's free disk against what the run will write there (ssh `shared_fs: false`); `LaunchError`.
    - `commands(stage, stage_json, run_dir, write_configs=...)` → `NodeCommand`s, one per process to
      start here (local: one; ssh: one per node; slurm: one `sbatch`/`srun`). Raises `LaunchError`.
      With `write_configs=False` (dry runs) nothing is written: a DeepSpeed config is only named.
    - `describe(cmds, started=False)`: the readable, redacted listing (`cpt-tui plan --commands`);
      `started=True`: the commands as `start` really runs them (stored in the 'stage_started' event).
    - `start(cmds, layout, attempt)` → one `Proc` per started process, output appended to
      `layout.log`. Each `Proc` must be serialisable (`to_json`) and identify the process well enough
      that a later supervisor can find it again (pid + start time; a Slurm job id in `pid`/`node`).
    - `poll(procs)` → per process: None while running, its exit code once it ended, `cpt_tui.procs.LOST` (-1)
      if it vanished without an exit status. 0 = success; the trainer's own verdict is in its events.
    - `stop(procs)`: graceful stop: SIGTERM reaches the trainer (it checkpoints, then exits 75), with
      nothing killed before the trainer's grace. `stop(procs, force=True)`: kill everything now (the
      supervisor calls it `stop_timeout` seconds after the graceful stop). Must not raise if gone.
    - `abort(procs)`: one process failed: end the others (they would hang in collectives).
    - `adopt(procs, sleep=, log=)`, after a supervisor restart, for the stage's recorded procs: return
      them (possibly already ended: `poll` then reports their exit codes) to re-attach, or None to make
      the supervisor start the stage again (it resumes from its last checkpoint). Local: re-attach to
      still-running keepers. SSH: the channels died with the old supervisor, so wait (`sleep`, which
      keeps the heartbeat) for the guards to end, kill leftovers, return None. Slurm: re-attach by job id.
    - `events_path(layout)`: where the trainer's events.jsonl is read from on the manager (today a
      file in the run directory shared with the nodes). A streaming backend returns its local copy.
    - `telemetry_commands(interval)` → `python -m engine.telemetry` per node (JSON lines on stdout);
      `start_telemetry(cmd, stdout, stderr)` starts one (guarded: ends with its channel/manager).
    - `prepare_stage(layout)` / `finish_stage(layout)`: push a stage's inputs to / pull its outputs
      from the nodes (no-ops with a shared run directory).
    - `catch_up_events(layout)`: before relaunching a stage that ran before (no adopted procs): bring
      the events its previous attempt wrote that `events_path` lacks (a streaming backend whose
      supervisor died mid-stage), so they are ingested as that attempt's (no-op when shared).
    - `requeue_reason(procs)`, once they ended: why the stage should be started again WITHOUT counting
      a crash (a scheduler's time limit or preemption after the trainer's checkpoint), or None.
      The supervisor requeues only if a newer checkpoint exists than when the attempt began.
    - `scheduler_state(procs)`: a small dict for the runs list (Slurm: job, state, reason), or None.
    """

    kind: str = ""

    def __init__(self, cluster: ClusterSpec, *, python: str = sys.executable, cpu: Optional[bool] = None,
                 ssh_config: Optional[PathLike] = None, kill_grace: Optional[float] = None,
                 local_env: Optional[Mapping[str, str]] = None):
        from cpt_tui.backends.accelerate import guard_grace

        self.cluster, self.python, self.cpu, self.ssh_config = cluster, python, cpu, ssh_config
        # The guard's grace covers torchrun's (cluster.stop_grace, TORCH_ELASTIC_SHUTDOWN_TIMEOUT)
        self.kill_grace = guard_grace(cluster.stop_grace) if kill_grace is None else kill_grace
        self.local_env = os.environ if local_env is None else local_env
        self.reports: dict[str, dict] = {}  # node name -> its preflight probe (engine/doctor.py)

    def preflight(self, timeout: float = 10, stages: Sequence[StageSpec] = ()) -> None:
        """Nothing to check by default. `stages`: those about to run (their precisions decide
        whether a node without CUDA is an error)."""

    def preflight_disk(self, preset: Preset, plan: dict) -> None:
        """After `preflight`, before data preparation (`cpt-tui --run`): check that every node has room
        for what the run will put there; raise `LaunchError` naming each node short of disk. Nothing
        to check with a shared run directory."""

    def probe(self, timeout: float = 60) -> dict[str, dict]:
        """Node name → `python -m engine.doctor --json` run there (`cpt-tui doctor`). Raises LaunchError."""
        raise LaunchError(f"{self.kind}: probing nodes is not supported")

    @abstractmethod
    def commands(self, stage: StageSpec, stage_json: str, run_dir: str, *, write_configs: bool = True,
                 module: str = "engine.train", main_process_port: Optional[int] = None) -> list[NodeCommand]:
        ...

    def describe(self, cmds: Sequence[NodeCommand], *, started: bool = False, attempt: int = 1) -> str:
        """The commands as a user would read them; `started`: as launched for stage attempt `attempt`."""
        return format_commands(cmds)

    def prepare_stage(self, layout: StageLayout) -> None:
        """Shared run directory: the nodes already see the stage's inputs."""

    @abstractmethod
    def start(self, cmds: Sequence[NodeCommand], layout: StageLayout, attempt: int) -> list[Proc]:
        ...

    def poll(self, procs: Sequence[Proc]) -> list[Optional[int]]:
        return [p.poll() for p in procs]

    @abstractmethod
    def stop(self, procs: Sequence[Proc], *, force: bool = False) -> None:
        ...

    def abort(self, procs: Sequence[Proc]) -> None:
        terminate([p.popen for p in procs if p.popen is not None and p.poll() is None], timeout=30)
        for p in procs:
            p.signal(signal.SIGTERM)  # adopted ones (no Popen here)

    @abstractmethod
    def adopt(self, procs: Sequence[Proc], *, sleep: Callable[[float], None],
              log: Callable[[str], None]) -> Optional[list[Proc]]:
        ...

    def events_path(self, layout: StageLayout) -> Path:
        return layout.events

    @abstractmethod
    def telemetry_commands(self, interval: float = 2.0, *, kill_grace: float = 5.0) -> list[NodeCommand]:
        ...

    def start_telemetry(self, cmd: NodeCommand, *, stdout=None, stderr=None):
        return start_guarded(cmd, stdout=stdout, stderr=stderr)

    def finish_stage(self, layout: StageLayout) -> None:
        """Shared run directory: the stage's outputs are already here."""

    def catch_up_events(self, layout: StageLayout) -> None:
        """Before relaunching a stage that ran before: bring here the events its previous attempt wrote
        that are not here yet (the supervisor ingests them as that attempt's). Shared run directory:
        they are here."""

    def requeue_reason(self, procs: Sequence[Proc]) -> Optional[str]:
        """No scheduler: every unsuccessful end follows the restart policy."""
        return None

    def failure_reason(self, procs: Sequence[Proc], layout: StageLayout) -> Optional[str]:
        """Why the stage's processes ended when the trainer said nothing (it never started), if the
        backend knows; None otherwise."""
        return None

    def scheduler_state(self, procs: Sequence[Proc]) -> Optional[dict]:
        return None


def backend_for(cluster: ClusterSpec, **kw) -> Backend:
    """The backend for `cluster.kind` (kw: python, cpu, ssh_config, kill_grace, local_env)."""
    if cluster.kind == "ssh":
        from cpt_tui.backends.ssh import SshBackend
        return SshBackend(cluster, **kw)
    if cluster.kind == "slurm":
        from cpt_tui.backends.slurm import SlurmBackend
        return SlurmBackend(cluster, **kw)
    from cpt_tui.backends.local import LocalBackend
    return LocalBackend(cluster, **kw)


# --------------------------------------------------------------------------- one-call helpers


def build_commands(cluster: ClusterSpec, stage: StageSpec, stage_json: str, run_dir: str, *,
                   python: str = sys.executable, cpu: Optional[bool] = None, module: str = "engine.train",
                   ssh_config: Optional[PathLike] = None, kill_grace: Optional[float] = None,
                   local_env: Optional[Mapping[str, str]] = None,
                   main_process_port: Optional[int] = None, write_configs: bool = True) -> list[NodeCommand]:
    """The commands that run `module <stage_json>` under accelerate for `stage` on `cluster`.

    Local: one command (`python` here). SSH: one per node, rank i = nodes[i]; the main process is
    nodes[0] at its `address` (or host). `cpu` (default: `cluster.device: cpu`) only affects the
    single-process `--cpu` flag and DeepSpeed pinned memory; otherwise the device is decided by the
    trainer on its node (never from this machine's devices). With `zero_stage > 0` a DeepSpeed config is
    written to `run_dir` and passed by path; `stage_json` and `run_dir` are used as given on every
    node (a shared filesystem, or paths relative to each node's workdir that the manager synced).
    `write_configs=False` (dry runs: `cpt-tui plan --commands`) writes nothing, only names the path.
    """
    b = backend_for(cluster, python=python, cpu=cpu, ssh_config=ssh_config, kill_grace=kill_grace,
                    local_env=local_env)
    return b.commands(stage, stage_json, run_dir, write_configs=write_configs, module=module,
                      main_process_port=main_process_port)


def build_telemetry_commands(cluster: ClusterSpec, *, interval: float = 2.0, python: str = sys.executable,
                             ssh_config: Optional[PathLike] = None, local_env: Optional[Mapping[str, str]] = None,
                             kill_grace: float = 5.0) -> list[NodeCommand]:
    """`python -m engine.telemetry --interval I --node NAME` per node (JSON lines on stdout)."""
    b = backend_for(cluster, python=python, ssh_config=ssh_config, local_env=local_env)
    return b.telemetry_commands(interval, kill_grace=kill_grace)


def preflight(cluster: ClusterSpec, *, ssh_config: Optional[PathLike] = None, timeout: float = 10,
              local_env: Optional[Mapping[str, str]] = None, stages: Sequence[StageSpec] = (),
              python: str = sys.executable) -> dict[str, dict]:
    """Check every node (see Backend.preflight); raises `LaunchError`. Returns the nodes' probes."""
    b = backend_for(cluster, ssh_config=ssh_config, local_env=local_env, python=python)
    b.preflight(timeout, stages=stages)
    return b.reports


def format_commands(cmds: Sequence[NodeCommand]) -> str:
    """A dry-run listing (`cpt-tui plan --commands`), secrets redacted."""
    lines = []
    for c in cmds:
        where = "ssh" if c.remote else "local"
        lines.append(f"# {c.node} (machine rank {c.rank}, {where}" + (f", workdir {c.workdir}" if c.workdir else "") + ")")
        lines.append(c.display)
        lines.append("")
    lines.append(f"# {GUARD_PLACEHOLDER}: a small Python wrapper (cpt_tui.procs._GUARD) that ends the whole "
                 "process tree when its stdin (the ssh channel / the manager) closes")
    return "\n".join(lines)


def dry_run(preset: Preset) -> dict[str, str]:
    """Stage name → the listing of its commands, nothing written (`cpt-tui plan --commands`, the UI's
    dry run). Raises `LaunchError`."""
    b = backend_for(preset.cluster)
    out = {}
    for st in preset.stages:
        cmds = b.commands(st, f"<run_dir>/stages/{st.name}/stage.json", "<run_dir>", write_configs=False)
        out[st.name] = b.describe(cmds)
    return out
