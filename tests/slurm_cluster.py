"""A real Slurm cluster of two nodes on this one machine, for tests (see /work/shared/TESTING-HOSTS.md).

Fixture (session scope): `slurm_cluster` → `SlurmCluster`. A test module uses it with

    from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)

    def test_x(slurm_cluster):
        job = slurm_cluster.sbatch("srun hostname", "--nodes=2")
        assert slurm_cluster.wait(job, timeout=60) == "COMPLETED"
        r = slurm_cluster.run(["squeue", "-h"])          # client commands get SLURM_CONF=<our conf>

Everything is the fixture's own, in one temporary directory: slurm.conf, cgroup.conf, a munge key, a
munged on its own socket (AuthInfo=socket=...), a slurmctld and two slurmd (`slurmd -N cn1`, `-N cn2`,
both on this host, NodeAddr=127.0.0.1) on free ports, state / spool / log dirs and pid files. Nothing is
written to /etc/slurm or /etc/munge, and no other Slurm on the machine is touched: client commands find
this cluster only through `SLURM_CONF` in `cluster.env` (which `run` passes).

The daemons run in the foreground (-D / -F) as children of the test process, so they are ours to stop by
pid (read from their pid files, cross-checked against the child pid). Teardown (also after a failing test
or a failed start): scancel every job, wait (bounded) for the queue to drain, SIGTERM slurmd, slurmctld,
munged by pid (SIGKILL after a timeout), end any job process still carrying this cluster's marker in its
environment, then remove the directory.

Skips with the reason when not root / not Linux / the binaries are missing — or fails instead when the CI
environment variable is set (a broken install must not hide as a skip; see .ci/setup-slurm.sh).
Every wait is bounded; a failed start reports the slurmctld / slurmd / munged log tails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import pytest

__all__ = ["slurm_cluster", "SlurmCluster", "SlurmError", "SLURM_BINARIES"]

SLURMCTLD = "/usr/sbin/slurmctld"
SLURMD = "/usr/sbin/slurmd"
MUNGED = "/usr/sbin/munged"
CLIENTS = ("sbatch", "srun", "squeue", "scancel", "scontrol", "sinfo")
SLURM_BINARIES = (SLURMCTLD, SLURMD, MUNGED, *CLIENTS)

NODES = ("cn1", "cn2")
PARTITION = "debug"
MARKER = "CPT_SLURM_FIXTURE"  # set in the daemons' environment (slurmstepd inherits it): finds our leftovers

START_TIMEOUT = 60.0  # daemons up and both nodes idle
STOP_TIMEOUT = 15.0  # per daemon, SIGTERM → exit, before SIGKILL
DRAIN_TIMEOUT = 20.0  # teardown: scancel → queue empty


class SlurmError(RuntimeError):
    pass


def _require(ok: bool, reason: str) -> None:
    """Skip with `reason` — or fail when CI is set (the Slurm tests must run in CI)."""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason} (run .ci/setup-slurm.sh as root)", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return f"--- {path.name}: (no log)"
    return f"--- {path.name} (last {len(lines)} lines)\n" + "\n".join(lines)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone for our purposes
    except (OSError, IndexError):
        return False


def _environ_has(pid: int, needles: Sequence[bytes]) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return False
    return any(n in env for n in needles)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


Cmd = Union[str, Sequence[str]]


@dataclass
class SlurmCluster:
    dir: Path
    conf: Path  # slurm.conf (SLURM_CONF)
    env: dict  # environment for client commands: os.environ + SLURM_CONF (+ the venv's PATH, inherited)
    nodes: list  # ["cn1", "cn2"]: Slurm node names (hostname -> this host; NodeAddr 127.0.0.1)
    partition: str  # "debug" (default partition, both nodes)
    node_addr: dict  # node name -> address the node is reached at (127.0.0.1 for both)
    hostname: str  # what `hostname` prints inside a job on either node (this host's short name)
    cluster_name: str
    ctld_port: int
    node_ports: dict  # node name -> slurmd port
    munge_socket: Path
    logs: dict  # "slurmctld" / "cn1" / "cn2" / "munged" -> log path
    pidfiles: dict  # same keys -> pid file
    version: str = ""  # `sinfo -V`, e.g. "slurm-wlm 22.05.8"
    _procs: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ commands

    def run(self, cmd: Cmd, timeout: float = 60, check: bool = False, **kw) -> subprocess.CompletedProcess:
        """Run a client command against this cluster: a string goes through `bash -c`, a list is an argv.
        Captures text output; `check=True` raises SlurmError with stdout/stderr on a non-zero exit."""
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("cwd", str(self.dir))
        env = dict(self.env)
        env.update(kw.pop("env", None) or {})
        r = subprocess.run(argv, timeout=timeout, env=env, **kw)
        if check and r.returncode != 0:
            raise SlurmError(f"{argv!r} exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")
        return r

    def sbatch(self, script: str, *args: str, timeout: float = 30) -> str:
        """Submit `script` (a bash script body; a #!/bin/bash line is added if missing) with sbatch `args`;
        return the job id. Output goes to <dir>/job-<id>.out unless args set -o."""
        if not script.startswith("#!"):
            script = "#!/bin/bash\n" + script
        if not any(a.startswith(("-o", "--output")) for a in args):
            args = (f"--output={self.dir}/job-%j.out", *args)
        r = self.run(["sbatch", "--parsable", *args], input=script, timeout=timeout)
        if r.returncode != 0:
            raise SlurmError(f"sbatch {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout.strip().split(";")[0]

    def output(self, job: str) -> str:
        p = self.dir / f"job-{job}.out"
        return p.read_text(errors="replace") if p.exists() else ""

    def job(self, job: str) -> dict:
        """`scontrol show job -o J` as a dict (JobState, Reason, NodeList, ExitCode, ...); {} once it is gone."""
        r = self.run(["scontrol", "show", "job", "-o", job], timeout=30)
        if r.returncode != 0 or not r.stdout.strip():
            return {}
        out: dict = {}
        for tok in r.stdout.split():
            k, sep, v = tok.partition("=")
            if sep and k not in out:
                out[k] = v
        return out

    def state(self, job: str) -> Optional[str]:
        return self.job(job).get("JobState")

    def squeue(self, job: str, fmt: str = "%T %r") -> str:
        """`squeue -h -j J -o FMT` (default: state and reason), stripped; '' when squeue no longer lists it."""
        return self.run(["squeue", "-h", "-j", job, "-o", fmt], timeout=30).stdout.strip()

    def wait(self, job: str, timeout: float = 60, states: Sequence[str] = ("COMPLETED", "FAILED", "CANCELLED",
             "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED")) -> str:
        """Poll `scontrol show job` until the job reaches one of `states` (default: any final state);
        return it, or raise SlurmError with the job record, its output and the log tails."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.state(job)
            if last in states:
                return last
            time.sleep(0.25)
        raise SlurmError(f"job {job} not in {tuple(states)} after {timeout:.0f}s (state {last}):\n"
                         f"{self.job(job)}\noutput:\n{self.output(job)}\n{self.log_tails()}")

    def log_tails(self, n: int = 25) -> str:
        """The last `n` lines of each daemon's log — or of its captured stdout/stderr where the log is missing or
        empty (munged -F logs to stderr; a daemon that dies on its configuration dies before opening its log)."""
        parts = []
        for p in self.logs.values():
            o = p.with_suffix(".stdout")
            if (not p.exists() or not p.stat().st_size) and o.exists() and o.stat().st_size:
                p = o
            parts.append(_tail(p, n))
        return "\n".join(parts)

    def cancel_all(self, timeout: float = DRAIN_TIMEOUT) -> bool:
        """scancel every job of this cluster and wait (bounded) until squeue lists none; True if it drained."""
        self.run(["scancel", "--full", "-p", self.partition], timeout=20)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.run(["squeue", "-h", "-o", "%i"], timeout=15)
            if r.returncode == 0 and not r.stdout.strip():
                return True
            time.sleep(0.2)
        return False


# ---------------------------------------------------------------------- configuration


def _slurm_conf(d: Path, name: str, host: str, ctld_port: int, node_ports: dict, sock: Path) -> str:
    nodes = "".join(
        f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs=1 RealMemory=1000 State=UNKNOWN\n"
        for n, p in node_ports.items())
    return f"""\
# Written by tests/slurm_cluster.py for one test session; nothing outside {d} is used.
ClusterName={name}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=5
OverTimeLimit=0
InactiveLimit=0
MailProg=/bin/true
MinJobAge=300
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=60
SchedulerParameters=defer_batch=0
{nodes}PartitionName={PARTITION} Nodes={",".join(node_ports)} Default=YES MaxTime=INFINITE State=UP
"""


CGROUP_CONF = """\
# proctrack/linuxproc + task/none: no cgroup plugin is used; this file only keeps slurmd from looking elsewhere.
CgroupPlugin=autodetect
IgnoreSystemd=yes
"""


# ---------------------------------------------------------------------- daemons


def _start(procs: dict, key: str, argv: list, env: dict, log: Path) -> None:
    out = open(log.with_suffix(".stdout"), "ab")
    try:
        procs[key] = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
    finally:
        out.close()


def _pid_of(cluster_dir: Path, pidfile: Path, proc: Optional[subprocess.Popen]) -> Optional[int]:
    """The daemon's pid: from its pid file when that names a live process of ours (its command line names
    our directory, or it is our child), else our child's pid."""
    try:
        pid = int(pidfile.read_text().split()[0])
        if _alive(pid) and (str(cluster_dir) in _cmdline(pid) or (proc is not None and pid == proc.pid)):
            return pid
    except (OSError, ValueError, IndexError):
        pass
    if proc is not None and proc.poll() is None:
        return proc.pid
    return None


def _stop_daemon(cluster_dir: Path, pidfile: Path, proc: Optional[subprocess.Popen]) -> None:
    pid = _pid_of(cluster_dir, pidfile, proc)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and _alive(pid):
            if proc is not None:
                proc.poll()  # reap our child as soon as it exits
            time.sleep(0.1)
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    if proc is not None:
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _kill_marked(needles: Sequence[bytes]) -> list:
    """SIGKILL every process whose environment carries one of `needles`: our marker (slurmstepd inherits it
    from slurmd) or our SLURM_CONF (job processes: they get the submitter's environment). With
    proctrack/linuxproc a job's orphaned background process (`sleep 300 &` in a script that exits) escapes
    Slurm's own cleanup; this finds it. Returns the pids."""
    me = os.getpid()
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        if _environ_has(pid, needles):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
    return killed


def _check_prereqs() -> None:
    _require(sys.platform.startswith("linux"), "the Slurm cluster fixture needs Linux")
    _require(os.geteuid() == 0, "the Slurm cluster fixture needs root (slurmd runs jobs as root here)")
    missing = [b for b in SLURM_BINARIES if not (os.access(b, os.X_OK) if b.startswith("/") else shutil.which(b))]
    _require(not missing, f"Slurm / munge binaries missing: {' '.join(missing)} (apt-get install slurm-wlm munge)")


def _start_cluster(d: Path, procs: dict) -> SlurmCluster:
    host = socket.gethostname().split(".")[0]
    name = f"cpt{os.getpid() % 100000}"
    for sub in ("state", "log", "munge", *(f"spool/{n}" for n in NODES)):
        (d / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o711)  # munged: the socket's directories need execute permission for all
    os.chmod(d / "munge", 0o711)
    sock = d / "munge" / "munge.socket"
    key = d / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)

    ctld_port = _free_port()
    node_ports = {}
    while len(node_ports) < len(NODES):
        p = _free_port()
        if p != ctld_port and p not in node_ports.values():
            node_ports[NODES[len(node_ports)]] = p
    conf = d / "slurm.conf"
    conf.write_text(_slurm_conf(d, name, host, ctld_port, node_ports, sock))
    (d / "cgroup.conf").write_text(CGROUP_CONF)

    logs = {"munged": d / "log" / "munged.log", "slurmctld": d / "log" / "slurmctld.log",
            **{n: d / "log" / f"slurmd-{n}.log" for n in NODES}}
    pidfiles = {"munged": d / "munge" / "munged.pid", "slurmctld": d / "slurmctld.pid",
                **{n: d / f"slurmd-{n}.pid" for n in NODES}}
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SQUEUE_", "SALLOC_"))
              and k != "SLURM_CONF"]:
        del env[k]  # a Slurm job environment around the tests must not leak into ours
    daemon_env = {**env, MARKER: str(d)}
    cluster = SlurmCluster(d, conf, env, list(NODES), PARTITION, {n: "127.0.0.1" for n in NODES}, host, name,
                           ctld_port, node_ports, sock, logs, pidfiles, _procs=procs)

    def fail(what: str) -> None:
        raise SlurmError(f"{what}\nslurm.conf: {conf}\n{cluster.log_tails()}")

    # munged: own key, socket, pid, log and seed files; foreground (-F) so it is our child.
    _start(procs, "munged", [MUNGED, "-F", f"--socket={sock}", f"--key-file={key}", f"--pid-file={pidfiles['munged']}",
                             f"--log-file={logs['munged']}", f"--seed-file={d / 'munge' / 'munged.seed'}"],
           daemon_env, logs["munged"])
    deadline = time.monotonic() + 20
    while not sock.exists() and procs["munged"].poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not sock.exists():
        fail(f"munged did not create {sock} (exit {procs['munged'].poll()})")

    _start(procs, "slurmctld", [SLURMCTLD, "-D", "-f", str(conf)], daemon_env, logs["slurmctld"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and procs["slurmctld"].poll() is None:
        if cluster.run(["scontrol", "ping"], timeout=15).stdout.count("UP") >= 1:
            break
        time.sleep(0.2)
    else:
        fail(f"slurmctld did not answer `scontrol ping` (exit {procs['slurmctld'].poll()})")

    for n in NODES:
        _start(procs, n, [SLURMD, "-D", "-f", str(conf), "-N", n], daemon_env, logs[n])

    deadline = time.monotonic() + START_TIMEOUT
    seen = ""
    while time.monotonic() < deadline:
        dead = [k for k, p in procs.items() if p.poll() is not None]
        if dead:
            fail(f"{', '.join(dead)} exited during start-up")
        r = cluster.run(["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %t"], timeout=15)
        seen = r.stdout.strip() + r.stderr.strip()
        states = dict(line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)
        if all(states.get(n) == "idle" for n in NODES):
            break
        time.sleep(0.25)
    else:
        fail(f"nodes not idle after {START_TIMEOUT:.0f}s; sinfo: {seen!r}")

    v = cluster.run(["sinfo", "-V"], timeout=15)
    cluster.version = v.stdout.strip()
    return cluster


def _teardown(d: Path, cluster: Optional[SlurmCluster], procs: dict) -> None:
    conf = d / "slurm.conf"
    ctld = procs.get("slurmctld")
    if cluster is not None and ctld is not None and ctld.poll() is None:
        try:
            cluster.cancel_all()
        except (subprocess.TimeoutExpired, OSError):
            pass
    pidfiles = {"munged": d / "munge" / "munged.pid", "slurmctld": d / "slurmctld.pid",
                **{n: d / f"slurmd-{n}.pid" for n in NODES}}
    for key in (*NODES, "slurmctld"):
        _stop_daemon(d, pidfiles[key], procs.get(key))
    # slurmstepd / job processes that outlived their slurmd or escaped proctrack/linuxproc
    _kill_marked([f"{MARKER}={d}".encode(), f"SLURM_CONF={conf}".encode()])
    _stop_daemon(d, pidfiles["munged"], procs.get("munged"))
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster():
    _check_prereqs()
    d = Path(tempfile.mkdtemp(prefix="cpt-slurm-"))
    procs: dict = {}
    cluster = None
    try:
        error = None
        try:
            cluster = _start_cluster(d, procs)
        except (SlurmError, subprocess.TimeoutExpired) as e:
            error = str(e)
        if error is not None:  # outside the except: one message, not a chained traceback
            pytest.fail(f"the Slurm test cluster did not start: {error}", pytrace=False)
        yield cluster
    finally:
        _teardown(d, cluster, procs)
