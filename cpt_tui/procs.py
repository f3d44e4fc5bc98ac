"""Process control on the manager's machine: the keeper and the guard, process identity from /proc,
signalling, and `Proc`, the record of a launched process that another supervisor can adopt.

Two wrappers, two survival rules:
- The keeper (`_KEEPER`, `start_kept`): runs a LOCAL command in its own session with stdin /dev/null,
  ignores the stop signal itself and writes the command's exit status to a file once nothing is left
  in its process group. Nothing ends it when the supervisor dies: local training outlives a dead
  supervisor, and a new one re-adopts it by (pid, start time) and reads the status from the file.
- The guard (`_GUARD`, `start`/`terminate`): `python -c <guard> <grace> <argv...>` starts argv in a new
  session, becomes a child subreaper, and when its stdin reaches EOF (the ssh channel or the manager
  went away), its parent dies, or it gets SIGTERM/SIGHUP/SIGINT, it SIGTERMs the whole process tree
  (torchrun puts workers in their own sessions, so process groups are not enough), waits `grace`
  seconds, then SIGKILLs what is left. Remote processes never outlive their channel (no orphans on
  GPU nodes); start guarded commands with `start()` (stdin a pipe kept open for the run's lifetime)
  and end them with `terminate()`.

The UI process imports this module: it must not import torch.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, Optional, Sequence

DEFAULT_KILL_GRACE = 20.0  # the guard's SIGTERM → SIGKILL grace (a checkpoint must fit in it)
LOST = -1  # exit code of a process that vanished without an exit status (kill -9 of its keeper)
STALE_S = 60.0  # no heartbeat for this long (and no pid to check): the supervisor is gone
ROOT = Path(__file__).resolve().parent.parent
ORIG_PYTHONPATH = "CPT_TUI_ORIG_PYTHONPATH"  # the starter's PYTHONPATH, for ssh nodes (see starter_env)
GUARD_PLACEHOLDER = "<guard>"


# --------------------------------------------------------------------------- /proc


def _proc_stat(pid: int) -> Optional[list[bytes]]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_start(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot: with the pid, it names one process."""
    st = _proc_stat(pid)
    return int(st[19]) if st else None


def proc_alive(pid: Optional[int], start: Optional[int] = None) -> bool:
    """Running (not a zombie: nobody may reap it here) and, if `start` is given, the same process."""
    if not pid:
        return False
    st = _proc_stat(pid)
    if st is None or st[0] in (b"Z", b"X"):
        return False
    return start is None or int(st[19]) == start


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def supervisor_alive(row: dict) -> bool:
    """Is the run's recorded supervisor alive? (PID on this host, heartbeat elsewhere.)"""
    if not row or not row.get("pid"):
        return False
    if row.get("host") == socket.gethostname():
        return proc_alive(row["pid"]) and "cpt_tui.supervisor" in _cmdline(row["pid"]) and row["id"] in _cmdline(row["pid"])
    return time.time() - (row.get("heartbeat") or 0) < STALE_S


# --------------------------------------------------------------------------- environments


def engine_env() -> dict:
    """The environment for engine subprocesses started on this machine."""
    env = dict(os.environ)
    # The engine is importable from the project root even when cpt-tui is not installed there.
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
    return env


def supervisor_env() -> dict:
    """The detached supervisor's environment: engine_env, remembering the starter's PYTHONPATH."""
    return {**engine_env(), ORIG_PYTHONPATH: os.environ.get("PYTHONPATH", "")}


def starter_env(env: dict) -> dict:
    """Inside the supervisor: the starting command's environment (what ssh nodes inherit), without
    the PYTHONPATH that supervisor_env() added."""
    env = dict(env)
    orig = env.pop(ORIG_PYTHONPATH, None)
    if orig is not None:
        env.pop("PYTHONPATH", None)
        if orig:
            env["PYTHONPATH"] = orig
    return env


def tail(path: Path, n: int = 12) -> str:
    """The last `n` meaningful lines of a log (progress bars dropped), for error messages."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    lines = [l for l in lines if l.strip() and "it/s]" not in l]
    return "\n" + "\n".join(lines[-n:]) if lines else ""


# --------------------------------------------------------------------------- the keeper

# `python -c _KEEPER EXIT_FILE argv...`. Runs argv in its own process group (a stop is one killpg),
# ignores the stop signal itself, and once argv has exited AND nothing else is left in the group
# (`accelerate launch` dies at once on SIGTERM while the trainer is still saving its checkpoint),
# writes the exit status: a status in the file means the stage's processes are really gone.
_KEEPER = r"""
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, lambda *a: None)
signal.signal(signal.SIGINT, lambda *a: None)
p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL)
rc = p.wait()
rc = rc if rc >= 0 else 128 - rc

def group_alive():
    me = os.getpid()
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != me:
            try:
                with open("/proc/" + d + "/stat", "rb") as f:
                    st = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(st[2]) == me and st[0] not in (b"Z", b"X"):
                return True
    return False

while group_alive():
    time.sleep(0.2)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(rc))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
sys.exit(rc)
""".strip()


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


def guarded(python: str, grace: float, argv: Sequence[str]) -> list[str]:
    """`python -c <guard> <grace> argv...` (the guard's code inline)."""
    return [python, "-c", _GUARD, f"{float(grace):g}", *argv]


# --------------------------------------------------------------------------- launched processes


def _read_exit(path: Optional[str]) -> Optional[int]:
    try:
        return int(Path(path).read_text()) if path else None
    except (OSError, ValueError):
        return None


@dataclass
class Proc:
    """A launched process as recorded in SQLite (`stages.procs`), so another supervisor can adopt it.
    `backend`: the kind of backend that started it ('local', 'ssh'), which adopts and signals it."""

    node: str
    pid: int
    start: Optional[int]
    launched: float
    exit_file: Optional[str] = None  # local keeper: its exit status lands here
    remote: bool = False
    backend: str = ""
    popen: Optional[subprocess.Popen] = field(default=None, repr=False)  # only in the launching supervisor

    def __post_init__(self):
        self.backend = self.backend or ("ssh" if self.remote else "local")  # records from before the field

    def poll(self) -> Optional[int]:
        if self.popen is not None:
            rc = self.popen.poll()
            return rc if rc is None or rc >= 0 else 128 - rc
        rc = _read_exit(self.exit_file)
        if rc is not None:
            return rc
        if proc_alive(self.pid, self.start):
            return None
        rc = _read_exit(self.exit_file)  # it may have finished between the two checks
        return LOST if rc is None else rc

    def signal(self, sig: int) -> None:
        try:
            if self.remote and self.popen is not None:
                signal_popen(self.popen, sig)
            elif proc_alive(self.pid, self.start):
                os.killpg(self.pid, sig)  # the keeper leads its own group: keeper, accelerate, trainer
        except (ProcessLookupError, PermissionError):
            pass

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "popen"}


def procs_of(stage_row: dict) -> list[Proc]:
    return [Proc(**p) for p in json.loads(stage_row.get("procs") or "[]")]


def start_kept(argv: Sequence[str], exit_file: str, log, env: dict, node: str = "local",
               backend: str = "local") -> Proc:
    """Start argv under the keeper in its own session (outlives this process), output to `log`."""
    Path(exit_file).unlink(missing_ok=True)
    p = subprocess.Popen([sys.executable, "-c", _KEEPER, exit_file, *argv], stdout=log, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    return Proc(node, p.pid, proc_start(p.pid), time.time(), exit_file, False, backend, p)


# --------------------------------------------------------------------------- guarded commands


def start(cmd, *, stdout=None, stderr=None, cwd: Optional[str] = None,
          prefix: Sequence[str] = ()) -> subprocess.Popen:
    """Start a NodeCommand in its own session with stdin a pipe that stays open: closing it (or this
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


def signal_popen(p: subprocess.Popen, sig: int) -> None:
    """Signal a child started here: its whole group when it leads one (start(), start_kept())."""
    if p.poll() is not None:
        return
    try:
        if os.getpgid(p.pid) == p.pid:
            os.killpg(p.pid, sig)
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
            signal_popen(p, signal.SIGTERM)

    def wait_all(deadline: float) -> None:
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass

    wait_all(time.monotonic() + timeout)
    left = [p for p in procs if p.poll() is None]
    for p in left:
        signal_popen(p, signal.SIGTERM)
    if left:
        wait_all(time.monotonic() + kill_after)
    for p in procs:
        if p.poll() is None:
            signal_popen(p, signal.SIGKILL)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
    return [p.returncode for p in procs]
