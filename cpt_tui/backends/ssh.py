"""The ssh backend: one `accelerate launch` per node over OpenSSH (rank i = nodes[i]), each under the
guard (see cpt_tui/procs.py), so remote processes never outlive their ssh channel (no orphans on GPU
nodes). If the supervisor dies the channels close and the remote trainers end; a new supervisor waits
for that, then relaunches the stage, which resumes from its last checkpoint (steps since then are
redone; this does not count as a restart). Events come back through a run directory shared with the
nodes (same absolute path).
"""

from __future__ import annotations

import math
import os
import shlex
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Optional, Sequence

from cpt_tui.backends import Backend, LaunchError, NodeCommand
from cpt_tui.backends.accelerate import LAUNCH_MODULE, default_cpu, launch_args, stage_deepspeed
from cpt_tui.backends.shell import check_env, placeholder, remote_path, remote_script
from cpt_tui.procs import GUARD_PLACEHOLDER, Proc, _GUARD, proc_start, start as start_guarded
from cpt_tui.redact import redact
from engine.layout import StageLayout
from engine.spec import ClusterSpec, NodeSpec, StageSpec

PROPAGATED_PREFIXES = ("NCCL_", "GLOO_", "TORCH_", "MASTER_")
PROPAGATED_NAMES = ("HF_HOME", "CUDA_VISIBLE_DEVICES", "PYTHONPATH")
ADOPT_WAIT_S = 60  # how long a new supervisor waits for the old one's remote processes to end
_CHECK = "import engine, accelerate; print(engine.__version__)"


def _propagated(name: str) -> bool:
    return name in PROPAGATED_NAMES or name.startswith(PROPAGATED_PREFIXES)


def node_names(cluster: ClusterSpec) -> list[str]:
    """Display names for the ssh nodes: the host, made unique with :port / #index where needed."""
    names = [n.host for n in cluster.nodes]
    if len(set(names)) < len(names):
        names = [f"{n.host}:{n.port or 22}" for n in cluster.nodes]
    if len(set(names)) < len(names):
        names = [f"{name}#{i}" for i, name in enumerate(names)]
    return names


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class SshBackend(Backend):
    kind = "ssh"

    # ------------------------------------------------------------------ command pieces
    def _node_env(self, node: NodeSpec, name: str, local_env: Optional[Mapping[str, str]] = None) -> dict[str, str]:
        env = {k: v for k, v in (self.local_env if local_env is None else local_env).items() if _propagated(k)}
        env.update(check_env(self.cluster.env, "cluster.env"))
        env.update(check_env(node.env, f"node {name}: env"))
        return env

    def _ssh_prefix(self, node: NodeSpec, name: str, extra: Sequence[str] = ()) -> list[str]:
        for what, value in (("host", node.host), ("user", node.user or "")):
            bad = value.startswith("-") or any(c.isspace() for c in value) or (what == "user" and "@" in value)
            if bad:  # an option-like or split-able destination would change what ssh does
                raise LaunchError(f"node {name}: invalid ssh {what} {value!r}")
        argv = ["ssh"]
        if self.ssh_config:
            argv += ["-F", os.fspath(self.ssh_config)]
        argv += list(self.cluster.ssh_options)  # first: ssh keeps the first value given for an option
        argv += ["-T", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4", *extra]
        if node.port:
            argv += ["-p", str(node.port)]
        argv.append(f"{node.user}@{node.host}" if node.user else node.host)
        argv.append("--")
        return argv

    def _guarded_command(self, rank: int, node: NodeSpec, name: str, grace: float, args: Sequence[str],
                         inner: list[str]) -> NodeCommand:
        """ssh to `node` running `<python> args...` under the guard in its workdir with its env."""
        env = self._node_env(node, name)
        rest = ["-c", _GUARD, f"{float(grace):g}", remote_path(node.python), *args]
        prefix = self._ssh_prefix(node, name)
        argv = [*prefix, remote_script(node.workdir, env, node.python, rest)]
        # the remote command as the node's shell sees it: env redacted, the guard's code as <guard>
        shown = remote_script(node.workdir, redact(env), node.python, ["-c", placeholder(GUARD_PLACEHOLDER), *rest[2:]])
        display = f"{shlex.join(prefix)} <remote>\n    remote: {shown}"
        return NodeCommand(name, argv, env, True, rank, inner, node.workdir, display)

    # ------------------------------------------------------------------ Backend
    def commands(self, stage: StageSpec, stage_json: str, run_dir: str, *, write_configs: bool = True,
                 module: str = "engine.train", main_process_port: Optional[int] = None) -> list[NodeCommand]:
        cpu = default_cpu() if self.cpu is None else self.cpu
        cluster = self.cluster
        names = node_names(cluster)
        per_node = [n.processes or cluster.processes_per_node for n in cluster.nodes]
        if len(set(per_node)) > 1:
            detail = ", ".join(f"{nm}: {p}" for nm, p in zip(names, per_node))
            raise LaunchError(f"every node must run the same number of processes (accelerate); got {detail}")
        machines, total = len(cluster.nodes), sum(per_node)
        ds_path = stage_deepspeed(stage, total, run_dir, cpu=cpu, write=write_configs)
        main = cluster.nodes[0]
        cmds = []
        for rank, (node, name) in enumerate(zip(cluster.nodes, names)):
            args = ["-m", LAUNCH_MODULE, *launch_args(
                total=total, machines=machines, rank=rank, main_ip=main.address or main.host,
                port=main_process_port or cluster.main_process_port, stage=stage, ds_path=ds_path, cpu=cpu,
                module=module, stage_json=stage_json)]
            cmds.append(self._guarded_command(rank, node, name, self.kill_grace, args, [node.python, *args]))
        return cmds

    def telemetry_commands(self, interval: float = 2.0, *, kill_grace: float = 5.0) -> list[NodeCommand]:
        cmds = []
        for rank, (node, name) in enumerate(zip(self.cluster.nodes, node_names(self.cluster))):
            tele = ["-m", "engine.telemetry", "--interval", f"{interval:g}", "--node", name]
            cmds.append(self._guarded_command(rank, node, name, kill_grace, tele, [node.python, *tele]))
        return cmds

    def preflight(self, timeout: float = 10) -> None:
        """Check every node: reachable over ssh (BatchMode, ConnectTimeout), and its python imports
        the engine and accelerate in its workdir with its env. Raises `LaunchError` listing every
        failing node (one line each, in node order)."""
        local_env = dict(self.local_env)
        names = node_names(self.cluster)
        nodes = self.cluster.nodes
        with ThreadPoolExecutor(max_workers=min(8, len(nodes))) as ex:
            results = list(ex.map(lambda i: self._preflight_node(nodes[i], names[i], timeout, local_env),
                                  range(len(nodes))))
        problems = [p for p in results if p]
        if problems:
            raise LaunchError("\n".join(problems))

    def _preflight_node(self, node: NodeSpec, name: str, timeout: float, local_env: Mapping[str, str]) -> Optional[str]:
        prefix = self._ssh_prefix(node, name, ["-o", f"ConnectTimeout={max(1, math.ceil(timeout))}"])
        try:
            r = subprocess.run([*prefix, "true"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=timeout + 5)
        except subprocess.TimeoutExpired:
            return f"node {name}: unreachable over ssh: no answer within {timeout:g} s"
        if r.returncode != 0:
            why = _last_line(r.stderr) or f"ssh exited with status {r.returncode}"
            return f"node {name}: unreachable over ssh: {why}"

        env = self._node_env(node, name, local_env)
        script = remote_script(node.workdir, env, node.python, ["-c", _CHECK], on_missing_dir="2>/dev/null || exit 97;")
        try:
            r = subprocess.run([*prefix, script], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=timeout + 60)
        except subprocess.TimeoutExpired:
            return f"node {name}: checking the engine with {node.python} timed out"
        if r.returncode == 97:
            return (f"node {name}: workdir {node.workdir} does not exist on {node.host}; create it "
                    f"(ssh {node.host} mkdir -p {shlex.quote(node.workdir)}) or fix `workdir`")
        if r.returncode == 255:
            return f"node {name}: unreachable over ssh: {_last_line(r.stderr) or 'connection failed'}"
        if r.returncode != 0:
            why = _last_line(r.stderr) or f"exit status {r.returncode}"
            return (f"node {name}: the engine is not installed for {node.python} on {node.host} ({why}); "
                    f"install with `{node.python} -m pip install cpt-tui` there (or `pip install -e <checkout>`), "
                    f"or put a checkout on PYTHONPATH in the node's env")
        return None

    def start(self, cmds: Sequence[NodeCommand], layout: StageLayout, attempt: int) -> list[Proc]:
        out = []
        with open(layout.log, "ab") as log:
            for c in cmds:
                p = start_guarded(c, stdout=log, stderr=subprocess.STDOUT)
                out.append(Proc(c.node, p.pid, proc_start(p.pid), time.time(), None, True, self.kind, p))
        return out

    def stop(self, procs: Sequence[Proc], *, force: bool = False) -> None:
        for p in procs:  # (data preparation is a local keeper even on an ssh cluster)
            if not force and p.remote and p.popen is not None:
                p.popen.stdin.close()  # the node's guard SIGTERMs the tree, then SIGKILLs after grace
            else:
                p.signal(signal.SIGKILL if force else signal.SIGTERM)

    def adopt(self, procs: Sequence[Proc], *, sleep, log) -> Optional[list[Proc]]:
        # Their ssh channels belonged to the dead supervisor: the guards are ending them. Wait, then
        # let the supervisor relaunch (the trainer resumes from its last checkpoint).
        live = [p for p in procs if p.poll() is None]
        if not live:
            return None
        log(f"waiting for {len(live)} ssh process(es) of the previous supervisor to end")
        deadline = time.monotonic() + ADOPT_WAIT_S
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            sleep(1)
        for p in procs:
            p.signal(signal.SIGKILL)
        return None
