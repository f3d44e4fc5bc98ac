"""Launch commands for the engine: `accelerate launch` argv lists, run locally or on nodes over ssh.

Everything here builds argv LISTS; nothing is run through a local shell. Over ssh the remote side
needs one command string: it is assembled from words each quoted exactly once for the remote POSIX
shell, so a workdir, path, python or env value containing shell metacharacters reaches the remote
side literally (`~/x` is expanded there as `"$HOME"/'x'`).

Every engine process tree runs under a small guard (`python -c <guard>`, see `_GUARD`): it starts
the command in a new session, becomes a child subreaper, and when its stdin reaches EOF (the ssh
channel or the manager went away), its parent dies, or it gets SIGTERM/SIGHUP/SIGINT, it SIGTERMs
the whole process tree (torchrun puts workers in their own sessions, so process groups are not
enough), waits `kill_grace` seconds, then SIGKILLs what is left. So: start commands with `start()`
(stdin is a pipe kept open for the run's lifetime) and end them with `terminate()`.
Exception by design: cpt_tui.supervisor runs a LOCAL command's unwrapped `launch` argv under its own
keeper instead, so that local training outlives a dead supervisor and can be re-adopted.

The UI process imports this module: it must not import torch.
"""

from __future__ import annotations

from engine.errors import UserError
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

from engine.spec import ClusterSpec, NodeSpec, StageSpec

__all__ = [
    "LaunchError", "NodeCommand", "build_commands", "build_telemetry_commands", "deepspeed_config",
    "format_commands", "mixed_precision", "node_names", "preflight", "redact", "start", "terminate",
    "PROPAGATED_PREFIXES", "PROPAGATED_NAMES",
]

LAUNCH_MODULE = "accelerate.commands.launch"
PROPAGATED_PREFIXES = ("NCCL_", "GLOO_", "TORCH_", "MASTER_")
PROPAGATED_NAMES = ("HF_HOME", "CUDA_VISIBLE_DEVICES", "PYTHONPATH")
SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")
REDACTED = "***"
DEFAULT_KILL_GRACE = 20.0

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TILDE_USER = re.compile(r"^~([A-Za-z0-9._][A-Za-z0-9._-]*)?(/.*)?$", re.DOTALL)


class LaunchError(UserError):
    """A user-facing launch problem (message names the node and what to do)."""


# --------------------------------------------------------------------------- the guard

# Runs on the node under the node's python: `python -c _GUARD <grace> <argv...>`. Kept free of
# single quotes so its shell quoting stays readable.
_GUARD = r"""
import ctypes, os, signal, subprocess, sys, threading, time
grace = float(sys.argv[1])
try:
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
except Exception:
    pass
me, parent = os.getpid(), os.getppid()
child = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, start_new_session=True)
lock = threading.Lock()

def tree():
    up = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/" + d + "/stat", "rb") as f:
                    st = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if st[0] != b"Z":
                up.setdefault(int(st[1]), []).append(int(d))
    out, todo = [], [me]
    while todo:
        for c in up.get(todo.pop(), ()):
            out.append(c)
            todo.append(c)
    return out

def stop(*_):
    with lock:
        termed, t0 = set(), time.monotonic()
        while True:
            pids = tree()
            late = time.monotonic() - t0 >= grace
            if not pids or time.monotonic() - t0 > grace + 30:
                return
            for p in pids:
                if late or p not in termed:
                    try:
                        os.kill(p, signal.SIGKILL if late else signal.SIGTERM)
                    except OSError:
                        pass
                    termed.add(p)
            time.sleep(0.1)

def eof():
    try:
        while os.read(0, 65536):
            pass
    except OSError:
        pass
    stop()

def orphaned():
    while os.getppid() == parent:
        time.sleep(1)
    stop()

for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(s, lambda *a: threading.Thread(target=stop, daemon=True).start())
threading.Thread(target=eof, daemon=True).start()
threading.Thread(target=orphaned, daemon=True).start()
while True:
    pid, status = os.waitpid(-1, 0)
    if pid == child.pid:
        break
rc = os.waitstatus_to_exitcode(status)
stop()
sys.exit(rc if rc >= 0 else 128 - rc)
""".strip() + "\n"

_GUARD_PLACEHOLDER = "<guard>"


# --------------------------------------------------------------------------- commands


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


class _Sh(str):
    """Shell text that is already quoted (inserted as is)."""


def _q(word: Union[str, _Sh]) -> str:
    return str(word) if isinstance(word, _Sh) else shlex.quote(word)


def _join(words: Iterable[Union[str, _Sh]]) -> str:
    return " ".join(_q(w) for w in words)


def _remote_path(path: str) -> Union[str, _Sh]:
    """A path word for the remote shell: `~`, `~/rest`, `~user/rest` expand there, the rest is literal."""
    m = _TILDE_USER.match(path)
    if not m:
        return path
    user, rest = m.group(1) or "", m.group(2) or ""
    head = f"~{user}" if user else '"$HOME"'
    if not rest:
        return _Sh(head)
    rest = rest[1:]
    return _Sh(head + "/" + (shlex.quote(rest) if rest else ""))


def mixed_precision(precision: str) -> str:
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def redact(env: Mapping[str, str]) -> dict[str, str]:
    """A copy with values of secret-looking variables (…TOKEN…, …KEY…, …SECRET…, …PASSWORD…) masked."""
    return {k: (REDACTED if any(m in k.upper() for m in SECRET_MARKERS) else v) for k, v in env.items()}


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


def _check_env(env: Mapping[str, str], where: str) -> dict[str, str]:
    for k, v in env.items():
        if not _ENV_NAME.match(k):
            raise LaunchError(f"{where}: environment variable name {k!r} is not valid (letters, digits, _)")
        if "\0" in str(v):
            raise LaunchError(f"{where}: the value of {k} contains a NUL byte")
    return {k: str(v) for k, v in env.items()}


def _node_env(cluster: ClusterSpec, node: NodeSpec, name: str, local_env: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in local_env.items() if _propagated(k)}
    env.update(_check_env(cluster.env, "cluster.env"))
    env.update(_check_env(node.env, f"node {name}: env"))
    return env


def _ssh_prefix(cluster: ClusterSpec, node: NodeSpec, name: str, ssh_config: Optional[Union[str, os.PathLike]],
                extra: Sequence[str] = ()) -> list[str]:
    for what, value in (("host", node.host), ("user", node.user or "")):
        bad = value.startswith("-") or any(c.isspace() for c in value) or (what == "user" and "@" in value)
        if bad:  # an option-like or split-able destination would change what ssh does
            raise LaunchError(f"node {name}: invalid ssh {what} {value!r}")
    argv = ["ssh"]
    if ssh_config:
        argv += ["-F", os.fspath(ssh_config)]
    argv += list(cluster.ssh_options)  # first: ssh keeps the first value given for an option
    argv += ["-T", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4", *extra]
    if node.port:
        argv += ["-p", str(node.port)]
    argv.append(f"{node.user}@{node.host}" if node.user else node.host)
    argv.append("--")
    return argv


def _remote_script(workdir: str, env: Mapping[str, str], python: str, rest: Sequence[Union[str, _Sh]],
                   *, on_missing_dir: str = "&&") -> str:
    """`cd -- <workdir> && exec env K=V ... <python> <rest...>` with every value quoted once."""
    if "=" in python:
        raise LaunchError(f"python {python!r}: the path must not contain '=' (it would be read as a variable)")
    words: list[Union[str, _Sh]] = [_Sh("exec"), _Sh("env")]
    words += [_Sh(k + "=" + shlex.quote(v)) for k, v in env.items()]
    words.append(_remote_path(python))
    words += list(rest)
    return f"cd -- {_q(_remote_path(workdir))} {on_missing_dir} {_join(words)}"


def _default_cpu() -> bool:
    return not os.path.exists("/dev/nvidia0")


def deepspeed_config(stage: StageSpec, world_size: int, *, cpu: bool = False) -> dict:
    """The DeepSpeed config for a stage (ZeRO stage, offload, batch sizes, clipping, precision)."""
    if world_size < 1:
        raise LaunchError(f"world size {world_size}: need at least one process")
    micro, glob = stage.micro_batch_size, stage.global_batch_size
    if glob % (micro * world_size):
        raise LaunchError(
            f"stage {stage.name}: global_batch_size {glob} is not a multiple of micro_batch_size {micro} × "
            f"{world_size} processes; change global_batch_size or the number of processes")
    accum = glob // (micro * world_size)
    zero: dict = {"stage": stage.zero_stage}
    if stage.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not cpu}
        if stage.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": not cpu}
    if stage.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": float(stage.optimizer.grad_clip or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": stage.precision == "bf16"},
        "fp16": {"enabled": stage.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if stage.precision == "fp16":
        cfg["fp16"].update({"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                            "hysteresis": 2, "min_loss_scale": 1})
    if stage.offload == "cpu":
        cfg["zero_force_ds_cpu_optimizer"] = False  # the engine's own optimizer is allowed with offload
    return cfg


def _display_remote(prefix: Sequence[str], node: NodeSpec, env: Mapping[str, str], rest: Sequence) -> str:
    """`ssh ... host -- <remote>` and, indented below, the remote command as the node's shell sees it
    (env redacted, the guard's code shown as <guard>)."""
    shown = _remote_script(node.workdir, redact(env), node.python, ["-c", _Sh(_GUARD_PLACEHOLDER), *rest[2:]])
    return f"{shlex.join(prefix)} <remote>\n    remote: {shown}"


def _launch_args(*, total: int, machines: int, rank: int, main_ip: Optional[str], port: int, stage: StageSpec,
                 ds_path: Optional[str], cpu: bool, module: str, stage_json: str) -> list[str]:
    a = ["--num_processes", str(total), "--num_machines", str(machines), "--machine_rank", str(rank)]
    if main_ip:
        a += ["--main_process_ip", main_ip]
    a += ["--main_process_port", str(port), "--mixed_precision", mixed_precision(stage.precision),
          "--dynamo_backend", "no"]
    if ds_path is not None:
        # accelerate: --use_deepspeed excludes --multi_gpu; it launches torchrun itself. Multi-node
        # needs the `standard` (torchrun on every node) launcher instead of the pdsh default.
        a += ["--use_deepspeed", "--deepspeed_config_file", ds_path]
        if machines > 1:
            a += ["--deepspeed_multinode_launcher", "standard"]
    elif total > 1:
        # Verified: --multi_gpu + Accelerator(cpu=True) gives MULTI_CPU with the full world size,
        # whereas --cpu --num_processes N starts one process.
        a += ["--multi_gpu"]
    elif cpu:
        a += ["--cpu"]
    a += ["-m", module, stage_json]
    return a


def build_commands(cluster: ClusterSpec, stage: StageSpec, stage_json: str, run_dir: str, *,
                   python: str = sys.executable, cpu: Optional[bool] = None, module: str = "engine.train",
                   ssh_config: Optional[Union[str, os.PathLike]] = None, kill_grace: float = DEFAULT_KILL_GRACE,
                   local_env: Optional[Mapping[str, str]] = None,
                   main_process_port: Optional[int] = None, write_configs: bool = True) -> list[NodeCommand]:
    """The commands that run `module <stage_json>` under accelerate for `stage` on `cluster`.

    Local: one command (`python` here). SSH: one per node, rank i = nodes[i]; the main process is
    nodes[0] at its `address` (or host). `cpu` (default: no /dev/nvidia0 here) only affects the
    single-process flags and DeepSpeed pinned memory. With `zero_stage > 0` a DeepSpeed config is
    written to `run_dir` and passed by path; `stage_json` and `run_dir` are used as given on every
    node (a shared filesystem, or paths relative to each node's workdir that the manager synced).
    `write_configs=False` (dry runs: `cpt-tui plan --commands`) writes nothing, only names the path.
    """
    cpu = _default_cpu() if cpu is None else cpu
    local_env = os.environ if local_env is None else local_env
    port = main_process_port or cluster.main_process_port
    grace = f"{float(kill_grace):g}"

    if cluster.kind == "ssh":
        names = node_names(cluster)
        per_node = [n.processes or cluster.processes_per_node for n in cluster.nodes]
        if len(set(per_node)) > 1:
            detail = ", ".join(f"{nm}: {p}" for nm, p in zip(names, per_node))
            raise LaunchError(f"every node must run the same number of processes (accelerate); got {detail}")
        machines = len(cluster.nodes)
    else:
        names, per_node, machines = ["local"], [cluster.processes_per_node], 1
    total = sum(per_node)

    ds_path = None
    if stage.zero_stage > 0:
        cfg = deepspeed_config(stage, total, cpu=cpu)
        ds_path = os.path.join(run_dir, f"deepspeed.{stage.name}.json")
        if write_configs:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            Path(ds_path).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")

    if cluster.kind != "ssh":
        env = _check_env(cluster.env, "cluster.env")
        inner = [python, "-m", LAUNCH_MODULE, *_launch_args(
            total=total, machines=1, rank=0, main_ip=None, port=port, stage=stage, ds_path=ds_path, cpu=cpu,
            module=module, stage_json=stage_json)]
        argv = [python, "-c", _GUARD, grace, *inner]
        shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in redact(env).items())
        display = (shown + " " if shown else "") + shlex.join([python, "-c", _GUARD_PLACEHOLDER, grace, *inner])
        return [NodeCommand("local", argv, env, False, 0, inner, None, display)]

    main = cluster.nodes[0]
    main_ip = main.address or main.host
    cmds = []
    for rank, (node, name) in enumerate(zip(cluster.nodes, names)):
        env = _node_env(cluster, node, name, local_env)
        launch_args = _launch_args(total=total, machines=machines, rank=rank, main_ip=main_ip, port=port,
                                   stage=stage, ds_path=ds_path, cpu=cpu, module=module, stage_json=stage_json)
        rest = ["-c", _GUARD, grace, _remote_path(node.python), "-m", LAUNCH_MODULE, *launch_args]
        prefix = _ssh_prefix(cluster, node, name, ssh_config)
        argv = [*prefix, _remote_script(node.workdir, env, node.python, rest)]
        display = _display_remote(prefix, node, env, rest)
        inner = [node.python, "-m", LAUNCH_MODULE, *launch_args]
        cmds.append(NodeCommand(name, argv, env, True, rank, inner, node.workdir, display))
    return cmds


def build_telemetry_commands(cluster: ClusterSpec, *, interval: float = 2.0, python: str = sys.executable,
                             ssh_config: Optional[Union[str, os.PathLike]] = None,
                             local_env: Optional[Mapping[str, str]] = None,
                             kill_grace: float = 5.0) -> list[NodeCommand]:
    """`python -m engine.telemetry --interval I --node NAME` per node (JSON lines on stdout)."""
    local_env = os.environ if local_env is None else local_env
    grace = f"{float(kill_grace):g}"
    if cluster.kind != "ssh":
        inner = [python, "-m", "engine.telemetry", "--interval", f"{interval:g}", "--node", "local"]
        return [NodeCommand("local", [python, "-c", _GUARD, grace, *inner], {}, False, 0, inner, None,
                            shlex.join([python, "-c", _GUARD_PLACEHOLDER, grace, *inner]))]
    cmds = []
    for rank, (node, name) in enumerate(zip(cluster.nodes, node_names(cluster))):
        env = _node_env(cluster, node, name, local_env)
        tele = ["-m", "engine.telemetry", "--interval", f"{interval:g}", "--node", name]
        rest = ["-c", _GUARD, grace, _remote_path(node.python), *tele]
        prefix = _ssh_prefix(cluster, node, name, ssh_config)
        argv = [*prefix, _remote_script(node.workdir, env, node.python, rest)]
        display = _display_remote(prefix, node, env, rest)
        cmds.append(NodeCommand(name, argv, env, True, rank, [node.python, *tele], node.workdir, display))
    return cmds


def format_commands(cmds: Sequence[NodeCommand]) -> str:
    """A dry-run listing (`cpt-tui plan --commands`), secrets redacted."""
    lines = []
    for c in cmds:
        where = "ssh" if c.remote else "local"
        lines.append(f"# {c.node} (machine rank {c.rank}, {where}" + (f", workdir {c.workdir}" if c.workdir else "") + ")")
        lines.append(c.display)
        lines.append("")
    lines.append(f"# {_GUARD_PLACEHOLDER}: a small Python wrapper (cpt_tui.launch._GUARD) that ends the whole "
                 "process tree when its stdin (the ssh channel / the manager) closes")
    return "\n".join(lines)


# --------------------------------------------------------------------------- preflight


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


_CHECK = "import engine, accelerate; print(engine.__version__)"


def _preflight_node(cluster: ClusterSpec, node: NodeSpec, name: str, ssh_config, timeout: float,
                    local_env: Mapping[str, str]) -> Optional[str]:
    prefix = _ssh_prefix(cluster, node, name, ssh_config, ["-o", f"ConnectTimeout={max(1, math.ceil(timeout))}"])
    try:
        r = subprocess.run([*prefix, "true"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout + 5)
    except subprocess.TimeoutExpired:
        return f"node {name}: unreachable over ssh: no answer within {timeout:g} s"
    if r.returncode != 0:
        why = _last_line(r.stderr) or f"ssh exited with status {r.returncode}"
        return f"node {name}: unreachable over ssh: {why}"

    env = _node_env(cluster, node, name, local_env)
    script = _remote_script(node.workdir, env, node.python, ["-c", _CHECK], on_missing_dir="2>/dev/null || exit 97;")
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


def preflight(cluster: ClusterSpec, *, ssh_config: Optional[Union[str, os.PathLike]] = None, timeout: float = 10,
              local_env: Optional[Mapping[str, str]] = None) -> None:
    """Check every ssh node: reachable over ssh (BatchMode, ConnectTimeout), and its python imports
    the engine and accelerate in its workdir with its env. Raises `LaunchError` listing every failing
    node (one line each, in node order). Local clusters: nothing to check."""
    if cluster.kind != "ssh":
        return
    local_env = dict(os.environ if local_env is None else local_env)
    names = node_names(cluster)
    with ThreadPoolExecutor(max_workers=min(8, len(cluster.nodes))) as ex:
        results = list(ex.map(lambda i: _preflight_node(cluster, cluster.nodes[i], names[i], ssh_config, timeout,
                                                         local_env), range(len(cluster.nodes))))
    problems = [p for p in results if p]
    if problems:
        raise LaunchError("\n".join(problems))


# --------------------------------------------------------------------------- running


def start(cmd: NodeCommand, *, stdout=None, stderr=None, cwd: Optional[str] = None,
          prefix: Sequence[str] = ()) -> subprocess.Popen:
    """Start a command in its own session with stdin a pipe that stays open: closing it (or this
    process dying) tells the guard to end the run. `prefix` (e.g. `ip netns exec ns`) goes first."""
    env = {**os.environ, **cmd.env} if not cmd.remote else None
    p = subprocess.Popen([*prefix, *cmd.argv], stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, env=env,
                         cwd=cwd, start_new_session=True)
    p.cpt_remote = cmd.remote  # type: ignore[attr-defined]
    p.cpt_node = cmd.node  # type: ignore[attr-defined]
    return p


def _is_remote(p: subprocess.Popen) -> bool:
    r = getattr(p, "cpt_remote", None)
    if r is not None:
        return bool(r)
    args = p.args if isinstance(p.args, (list, tuple)) else [p.args]
    return "ssh" in [os.path.basename(str(a)) for a in args[:6]]


def _signal(p: subprocess.Popen, sig: int) -> None:
    if p.poll() is not None:
        return
    try:
        if os.getpgid(p.pid) == p.pid:
            os.killpg(p.pid, sig)  # started by start(): its own group
        else:
            p.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


def terminate(procs: Iterable[subprocess.Popen], *, timeout: float = DEFAULT_KILL_GRACE + 10,
              kill_after: float = 5.0) -> list[Optional[int]]:
    """End started commands. Closes every stdin (the guards end their trees: SIGTERM, grace, SIGKILL),
    SIGTERMs local process groups, waits `timeout`; then SIGTERMs what is left (an ssh client: the
    connection drops, the remote guard sees EOF), and after `kill_after` SIGKILLs. Return codes."""
    procs = list(procs)
    for p in procs:
        if p.stdin is not None and not p.stdin.closed:
            try:
                p.stdin.close()
            except OSError:
                pass
    for p in procs:
        if not _is_remote(p):
            _signal(p, signal.SIGTERM)

    def wait_all(deadline: float) -> None:
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass

    wait_all(time.monotonic() + timeout)
    left = [p for p in procs if p.poll() is None]
    for p in left:
        _signal(p, signal.SIGTERM)
    if left:
        wait_all(time.monotonic() + kill_after)
    for p in procs:
        if p.poll() is None:
            _signal(p, signal.SIGKILL)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
    return [p.returncode for p in procs]
