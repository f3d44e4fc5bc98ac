"""The ssh backend: one `accelerate launch` per node over OpenSSH (rank i = nodes[i]), each under the
guard (see cpt_tui/procs.py), so remote processes never outlive their ssh channel (no orphans on GPU
nodes). If the supervisor dies the channels close and the remote trainers end; a new supervisor waits
for that, then relaunches the stage, which resumes from its last checkpoint (steps since then are
redone; this does not count as a restart). Events come back through a run directory shared with the
nodes (same absolute path).
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import shlex
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Optional, Sequence

from cpt_tui.backends import Backend, LaunchError, NodeCommand
from cpt_tui.backends.accelerate import LAUNCH_MODULE, forced_cpu, launch_args, stage_deepspeed, stop_env
from cpt_tui.backends.shell import check_env, placeholder, remote_path, remote_script
from cpt_tui.procs import GUARD_PLACEHOLDER, Proc, _GUARD, proc_start, start as start_guarded
from cpt_tui.redact import redact
from engine.gpus import problems
from engine.layout import StageLayout
from engine.spec import ClusterSpec, NodeSpec, StageSpec

# Copied from the manager: settings that mean the same on every machine. Not copied: names of the
# manager's own devices and interfaces (CUDA_VISIBLE_DEVICES, NCCL_SOCKET_IFNAME, ...) and library
# paths (LD_LIBRARY_PATH): give those per node in `nodes[i].env` (or cluster.env) if needed.
PROPAGATED_PREFIXES = ("NCCL_", "GLOO_", "TORCH_", "MASTER_", "FI_", "UCX_")
PROPAGATED_NAMES = ("HF_HOME", "PYTHONPATH")
MACHINE_SPECIFIC = ("NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "GLOO_SOCKET_IFNAME", "UCX_NET_DEVICES",
                    "NCCL_TOPO_FILE", "MASTER_ADDR")
SSH_MAIN_PORT = 29500  # the main process port on nodes[0] unless cluster.main_process_port says otherwise
ADOPT_WAIT_S = 60  # how long a new supervisor waits for the old one's remote processes to end
_PROBE = ["-m", "engine.doctor", "--json"]  # the preflight's check on each node (engine/doctor.py)


def _propagated(name: str) -> bool:
    return (name in PROPAGATED_NAMES or name.startswith(PROPAGATED_PREFIXES)) and name not in MACHINE_SPECIFIC


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


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
        env.update(stop_env(self.cluster.stop_grace))
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
        cpu = forced_cpu(self.cluster.device) if self.cpu is None else self.cpu  # else each node decides
        cluster = self.cluster
        names = node_names(cluster)
        per_node = [n.processes or self._auto_processes(name) for n, name in zip(cluster.nodes, names)]
        if len(set(per_node)) > 1:
            detail = ", ".join(f"{nm}: {p}" for nm, p in zip(names, per_node))
            raise LaunchError(f"every node must run the same number of processes (accelerate); got {detail}")
        machines, total = len(cluster.nodes), sum(per_node)
        ds_path = stage_deepspeed(stage, total, run_dir, cpu=cpu, write=write_configs)
        main = cluster.nodes[0]
        if machines > 1 and not main.address and not _is_ip(main.host):
            raise LaunchError(f"node {names[0]}: set its `address` (the IP the other nodes reach it at): the ssh "
                              f"alias {main.host!r} is the main process address otherwise, and other nodes may not "
                              "resolve it")
        cmds = []
        for rank, (node, name) in enumerate(zip(cluster.nodes, names)):
            args = ["-m", LAUNCH_MODULE, *launch_args(
                total=total, machines=machines, rank=rank, main_ip=main.address or main.host,
                port=main_process_port or cluster.main_process_port or SSH_MAIN_PORT, stage=stage, ds_path=ds_path, cpu=cpu,
                module=module, stage_json=stage_json)]
            cmds.append(self._guarded_command(rank, node, name, self.kill_grace, args, [node.python, *args]))
        return cmds

    def _auto_processes(self, name: str) -> int:
        """processes_per_node (`auto`: the GPU count torch saw on the node at preflight)."""
        n = self.cluster.processes_per_node
        if n != "auto":
            return n
        rep = self.reports.get(name)
        if rep is None:
            raise LaunchError(f"node {name}: processes_per_node is auto, resolved from the node's preflight probe; "
                              "set processes_per_node (the GPUs per node, `cpt-tui doctor` lists them) to plan "
                              "without contacting the nodes")
        return rep["processes_auto"]

    def telemetry_commands(self, interval: float = 2.0, *, kill_grace: float = 5.0) -> list[NodeCommand]:
        cmds = []
        for rank, (node, name) in enumerate(zip(self.cluster.nodes, node_names(self.cluster))):
            tele = ["-m", "engine.telemetry", "--interval", f"{interval:g}", "--node", name]
            cmds.append(self._guarded_command(rank, node, name, kill_grace, tele, [node.python, *tele]))
        return cmds

    def preflight(self, timeout: float = 10, stages: Sequence[StageSpec] = ()) -> None:
        """Check every node: reachable over ssh (BatchMode, ConnectTimeout), and its python runs the
        probe (`python -m engine.doctor --json`: engine and torch import) in its workdir with its env.
        A node where torch sees no CUDA fails with `device: cuda`, or with `device: auto` and a bf16/fp16
        stage. Raises `LaunchError` listing every failing node (one line each, in node order). The
        probes are kept in `self.reports` (processes_per_node auto, `cpt-tui doctor`)."""
        local_env = dict(self.local_env)
        names = node_names(self.cluster)
        nodes = self.cluster.nodes
        precisions = {st.precision for st in stages}
        with ThreadPoolExecutor(max_workers=min(8, len(nodes))) as ex:
            results = list(ex.map(lambda i: self._preflight_node(nodes[i], names[i], timeout, local_env),
                                  range(len(nodes))))
        bad = []
        for name, r in zip(names, results):
            if isinstance(r, str):
                bad.append(r)
            else:
                self.reports[name] = r
                bad += [f"node {name}: {p}" for p in problems(r, self.cluster.device, precisions)]
        if bad:
            raise LaunchError("\n".join(bad))

    def probe(self, timeout: float = 60) -> dict[str, dict]:
        self.preflight(timeout)
        return self.reports

    def _preflight_node(self, node: NodeSpec, name: str, timeout: float, local_env: Mapping[str, str]):
        """The node's probe report (dict), or why the node failed (str)."""
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
        script = remote_script(node.workdir, env, node.python, [*_PROBE, "--device", self.cluster.device],
                               on_missing_dir="2>/dev/null || exit 97;")
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
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        try:
            return json.loads(lines[-1])
        except (IndexError, ValueError):
            return f"node {name}: the probe (python -m engine.doctor --json) printed no report: {_last_line(r.stdout)!r}"

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
