"""Real hosts for tests: an sshd on loopback, and two "nodes" in network namespaces with an sshd each.

Fixtures (session scope), re-exported by tests/conftest.py:

- `sshd_loopback` → `SshHost`: sshd on 127.0.0.1:<free port> with throwaway host and client keys and a
  client config (`ssh -F host.ssh_config node-a ...`; aliases node-a, node-b → 127.0.0.1).
- `netns_nodes` → `NetnsNodes`: namespaces joined by a veth pair, 10.77.<pid%200>.1/.2, an sshd in
  each; aliases node-a / node-b; run ssh clients inside the first namespace (`nodes.run(argv)`,
  `nodes.prefix + argv`): the namespaces are isolated from the root namespace.
- `netns_private_nodes` → `PrivateNodes`: the same, each sshd also in its own mount namespace with a
  tmpfs workdir the manager cannot see (`workdirs[alias]`, and a tiny `small[alias]`): nodes without a
  shared disk (`cluster.shared_fs: false`, tests/test_ssh_noshare.py).

Where the machine cannot do this (not root, no sshd / ip), the fixtures skip with the reason; with the
CI environment variable set they fail instead (CI must run them: see .ci/setup-hosts.sh).
Everything is torn down by pid / by name; traffic stays on loopback and inside the namespaces.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import pytest

__all__ = ["sshd_loopback", "netns_nodes", "netns_private_nodes", "SshHost", "NetnsNodes", "PrivateNodes",
           "require", "free_port", "SSHD"]

SSHD = "/usr/sbin/sshd"


def require(ok: bool, reason: str) -> None:
    """Skip with `reason` — or fail when CI is set (the hosts tests must run in CI)."""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason} (run .ci/setup-hosts.sh as root)", pytrace=False)
    pytest.skip(reason)


def procs_matching(match) -> list[int]:
    """pids of this machine's processes whose (pid string, argv bytes list) satisfy `match`."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and match(d, argv):
            out.append(int(d))
    return out


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for a test's rendezvous or sshd. Taken BELOW the kernel's ephemeral range: a test
    keeps its port across stage attempts, and a port from bind(0) may meanwhile become the local end of
    any outgoing connection on the machine (the other pytest worker's gloo/ssh traffic), so the next
    attempt could not bind it."""
    low = _ephemeral_low()
    if low <= 4096:
        lo, hi = 0, 1  # no room below the range: bind(0)
    else:  # each pytest-xdist worker its own slice, so two workers never pick the same port
        worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
        n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        span = (low - 2048) // max(n, 1)
        lo = 2048 + worker * span
        hi = lo + span
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(lo, hi)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port below {low} on {host}")


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _check_ssh_tools() -> None:
    require(os.path.exists(SSHD), f"{SSHD} not found: apt-get install openssh-server")
    require(shutil.which("ssh") is not None and shutil.which("ssh-keygen") is not None,
            "ssh / ssh-keygen not found: apt-get install openssh-client")
    if not os.path.isdir("/run/sshd"):
        try:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        except OSError as e:
            require(False, f"/run/sshd is missing and cannot be created ({e.strerror}); sshd needs it")


def _keys(d: Path) -> tuple[Path, Path]:
    host_key, key = d / "hostkey", d / "key"
    for k in (host_key, key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cpt-tui-tests", "-f", str(k)],
                       check=True, capture_output=True, timeout=30)
    shutil.copy(d / "key.pub", d / "authorized_keys")
    for p in (host_key, key, d / "authorized_keys"):
        os.chmod(p, 0o600)
    return host_key, key


def _sshd_config(path: Path, d: Path, host_key: Path, listen: str, port: int, pidfile: Path) -> None:
    path.write_text(
        f"ListenAddress {listen}\n"
        f"Port {port}\n"
        f"HostKey {host_key}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"PidFile {pidfile}\n"
        "StrictModes no\n"
        "PermitRootLogin yes\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "PrintMotd no\n"
        "PrintLastLog no\n"
        "MaxStartups 64:30:128\n"
        "MaxSessions 64\n"
        "LogLevel INFO\n"
    )


def _client_block(aliases: Sequence[str], hostname: str, port: int, user: str) -> str:
    return (
        f"Host {' '.join(aliases)}\n"
        f"    HostName {hostname}\n"
        f"    Port {port}\n"
        f"    User {user}\n"
    )


def _client_defaults(key: Path, user: str) -> str:
    return (
        "Host *\n"
        f"    User {user}\n"
        f"    IdentityFile {key}\n"
        "    IdentitiesOnly yes\n"
        "    StrictHostKeyChecking no\n"
        "    UserKnownHostsFile /dev/null\n"
        "    GlobalKnownHostsFile /dev/null\n"
        "    BatchMode yes\n"
        "    LogLevel ERROR\n"
        "    ConnectTimeout 10\n"
        "    ControlMaster no\n"
        "    ControlPath none\n"
    )


def _stop(proc: Optional[subprocess.Popen], timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def _log_tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- loopback


@dataclass
class SshHost:
    host: str  # 127.0.0.1
    port: int
    user: str
    key: Path  # client private key
    ssh_config: Path  # client config: `ssh -F ssh_config node-a`
    aliases: list[str]
    dir: Path
    log: Path
    pid: int

    def ssh_argv(self, alias: str, *remote: str) -> list[str]:
        return ["ssh", "-F", str(self.ssh_config), alias, "--", *remote]

    def run(self, alias: str, remote: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.ssh_argv(alias, remote), capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="session")
def sshd_loopback():
    _check_ssh_tools()
    d = Path(tempfile.mkdtemp(prefix="cpt-sshd-"))
    host_key, key = _keys(d)
    user = getpass.getuser()
    proc = None
    log = d / "sshd.log"
    try:
        for attempt in range(5):  # the free port can be taken between probe and bind: retry
            port = free_port()
            cfg = d / "sshd_config"
            _sshd_config(cfg, d, host_key, "127.0.0.1", port, d / "sshd.pid")
            # -D: stay in the foreground, so the pid is ours to stop; -E: log to a file.
            proc = subprocess.Popen([SSHD, "-D", "-f", str(cfg), "-E", str(log)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and proc.poll() is None and not _port_open("127.0.0.1", port):
                time.sleep(0.05)
            if proc.poll() is None and _port_open("127.0.0.1", port):
                break
            _stop(proc)
            proc = None
        if proc is None:
            pytest.fail(f"sshd did not start on loopback:\n{_log_tail(log)}", pytrace=False)
        aliases = ["node-a", "node-b"]
        ssh_config = d / "ssh_config"
        ssh_config.write_text(_client_block(aliases, "127.0.0.1", port, user) + _client_defaults(key, user))
        host = SshHost("127.0.0.1", port, user, key, ssh_config, aliases, d, log, proc.pid)
        r = host.run("node-a", "echo ok", timeout=30)
        if r.returncode != 0 or r.stdout.strip() != "ok":
            pytest.fail(f"ssh to the loopback sshd failed (rc {r.returncode}): {r.stderr}\n{_log_tail(log)}",
                        pytrace=False)
        yield host
    finally:
        _stop(proc)
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- network namespaces


@dataclass
class NetnsNodes:
    nodes: list[str]  # ssh aliases: node-a (rank 0, in namespaces[0]), node-b
    namespaces: list[str]
    addresses: dict[str, str]  # alias → veth address
    ifnames: dict[str, str]  # alias → veth interface name (for GLOO_SOCKET_IFNAME)
    port: int  # sshd port in each namespace
    ssh_config: Path
    key: Path
    user: str
    dir: Path
    sshd_pids: list[int] = field(default_factory=list)

    @property
    def prefix(self) -> list[str]:
        """argv prefix that runs a command inside the first namespace (where the ssh clients run)."""
        return ["ip", "netns", "exec", self.namespaces[0]]

    def run(self, argv: Sequence[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run([*self.prefix, *argv], timeout=timeout, **kw)

    def ssh(self, alias: str, remote: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return self.run(["ssh", "-F", str(self.ssh_config), alias, "--", remote], timeout=timeout)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


_PROBE = """
import socket, sys, time
deadline = time.monotonic() + float(sys.argv[1])
targets = [(a, int(sys.argv[2])) for a in sys.argv[3:]]
while targets and time.monotonic() < deadline:
    for t in list(targets):
        try:
            socket.create_connection(t, timeout=0.5).close()
            targets.remove(t)
        except OSError:
            pass
    time.sleep(0.05)
sys.exit(1 if targets else 0)
"""


@contextlib.contextmanager
def _netns_pair(suffixes: str, net: str, private: bool):
    """Two sshd nodes (node-a, node-b) in their own network namespaces joined by a veth pair; with
    `private`, each sshd runs in its own mount namespace with tmpfs workdirs the manager cannot see."""
    require(sys.platform.startswith("linux"), "network namespaces need Linux")
    require(os.geteuid() == 0, "network namespaces need root")
    require(shutil.which("ip") is not None, "`ip` not found: apt-get install iproute2")
    require(not private or shutil.which("unshare") is not None, "`unshare` not found: apt-get install util-linux")
    _check_ssh_tools()

    pid = os.getpid()
    ns = [f"cpt{pid}{x}" for x in suffixes]
    ifs = [f"cv{pid}{x}" for x in suffixes]  # <= 15 characters
    addrs = [f"{net}.1", f"{net}.2"]
    aliases = ["node-a", "node-b"]
    d = Path(tempfile.mkdtemp(prefix="cpt-private-" if private else "cpt-netns-"))
    created: list[str] = []
    procs: list[subprocess.Popen] = []
    work = {al: str(d / al / "work") for al in aliases}
    small = {al: str(d / al / "small") for al in aliases}
    try:
        try:
            for n in ns:
                _ip("netns", "add", n)
                created.append(n)
        except RuntimeError as e:
            require(False, f"cannot create network namespaces: {e}")
        _ip("link", "add", ifs[0], "type", "veth", "peer", "name", ifs[1])
        for n, i, a in zip(ns, ifs, addrs):
            _ip("link", "set", i, "netns", n)
            _ip("-n", n, "addr", "add", f"{a}/24", "dev", i)
            _ip("-n", n, "link", "set", "lo", "up")
            _ip("-n", n, "link", "set", i, "up")

        host_key, key = _keys(d)
        user = getpass.getuser()
        port = 2222
        for n, a, al in zip(ns, addrs, aliases):
            cfg = d / f"sshd_config.{n}"
            log = d / f"sshd.{n}.log"
            _sshd_config(cfg, d, host_key, a, port, d / f"sshd.{n}.pid")
            # `ip netns exec` execs sshd, so the Popen pid is sshd's pid (-D: foreground).
            argv = ["ip", "netns", "exec", n, SSHD, "-D", "-f", str(cfg), "-E", str(log)]
            if private:
                os.makedirs(work[al])
                os.makedirs(small[al])
                script = ('mount --make-rprivate / && mount -t tmpfs -o size=512m tmpfs "$1" && '
                          'mount -t tmpfs -o size="$2" tmpfs "$3" && exec "$4" -D -f "$5" -E "$6"')
                argv = ["ip", "netns", "exec", n, "unshare", "-m", "sh", "-c", script, "sh", work[al],
                        str(SMALL_BYTES), small[al], SSHD, str(cfg), str(log)]
            procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE))
        probe = subprocess.run(["ip", "netns", "exec", ns[0], sys.executable, "-c", _PROBE, "20", str(port), *addrs],
                               capture_output=True, text=True, timeout=60)
        if probe.returncode != 0 or any(p.poll() is not None for p in procs):
            errs = "\n".join((p.stderr.read().decode() if p.poll() is not None else "") for p in procs)
            logs = "\n".join(_log_tail(d / f"sshd.{n}.log") for n in ns)
            pytest.fail(f"sshd in the namespaces did not come up: {probe.stderr}\n{errs}\n{logs}", pytrace=False)

        ssh_config = d / "ssh_config"
        ssh_config.write_text("".join(_client_block([al], a, port, user) for al, a in zip(aliases, addrs))
                              + _client_defaults(key, user))
        common = (aliases, ns, dict(zip(aliases, addrs)), dict(zip(aliases, ifs)), port, ssh_config, key, user, d,
                  [p.pid for p in procs])
        nodes = PrivateNodes(*common, work, small) if private else NetnsNodes(*common)
        for al in aliases:
            r = nodes.ssh(al, f"touch {work[al]}/.probe && echo ok" if private else "echo ok")
            if r.returncode != 0 or r.stdout.strip() != "ok":
                pytest.fail(f"ssh to {al} inside the namespaces failed (rc {r.returncode}): {r.stderr}",
                            pytrace=False)
            if private:
                assert not os.path.exists(f"{work[al]}/.probe"), "the node's workdir is not private"
        yield nodes
    finally:
        for p in procs:
            _stop(p)
        for n in created:
            # Anything a test left running inside our namespaces is ours: end it before deleting.
            r = _ip("netns", "pids", n, check=False)
            for x in r.stdout.split():
                try:
                    os.kill(int(x), signal.SIGKILL)
                except (ValueError, OSError):
                    pass
            _ip("netns", "del", n, check=False)
        # A veth that never made it into a namespace (setup failed half-way) is still in ours.
        if _ip("link", "show", ifs[0], check=False).returncode == 0:
            _ip("link", "del", ifs[0], check=False)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def netns_nodes():
    with _netns_pair("ab", f"10.77.{os.getpid() % 200}", private=False) as nodes:
        yield nodes


# --------------------------------------------------------------------------- nodes with private disks


@dataclass
class PrivateNodes(NetnsNodes):
    """`NetnsNodes` whose sshd (and so everything started over ssh) runs in its own mount namespace
    with tmpfs mounts the manager cannot see: `workdirs[alias]` (large) and `small[alias]` (SMALL_BYTES)."""

    workdirs: dict[str, str] = field(default_factory=dict)
    small: dict[str, str] = field(default_factory=dict)

    def node_shell(self, alias: str, script: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run `script` on the node (inside its private mounts), over ssh."""
        return self.ssh(alias, script, timeout=timeout)


SMALL_BYTES = 256 * 1024


@pytest.fixture(scope="session")
def netns_private_nodes():
    """Two ssh nodes in network namespaces, each with a private workdir (tmpfs in its own mount
    namespace): nothing the nodes write there is visible to the manager, as on separate machines."""
    with _netns_pair("pq", f"10.78.{os.getpid() % 200}", private=True) as nodes:
        yield nodes
