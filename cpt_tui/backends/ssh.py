"""The ssh backend: one `accelerate launch` per node over OpenSSH (rank i = nodes[i]), each under the
guard (see cpt_tui/procs.py), so remote processes never outlive their ssh channel (no orphans on GPU
nodes). If the supervisor dies the channels close and the remote trainers end; a new supervisor waits
for that, then relaunches the stage, which resumes from its last checkpoint (steps since then are
redone; this does not count as a restart). Events come back through a run directory shared with the
nodes (same absolute path) — or, with `cluster.shared_fs: false`, nothing is shared: each stage's
inputs are pushed to every node's workdir with rsync (cpt_tui/backends/sync.py), rank 0's events.jsonl
is streamed back over ssh into the run directory here (cpt_tui/backends/stream.py), checkpoints stay
on the nodes (a restart resumes from each node's own), and final/ is pulled back after the stage.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Mapping, Optional, Sequence

from cpt_tui.backends import Backend, LaunchError, NodeCommand
from cpt_tui.backends import sync
from cpt_tui.backends.accelerate import LAUNCH_MODULE, forced_cpu, launch_args, stage_deepspeed, stop_env
from cpt_tui.backends.shell import _q, check_env, placeholder, remote_path, remote_script
from cpt_tui.backends.stream import MARK, READER, EventStream, Notes
from cpt_tui.procs import GUARD_PLACEHOLDER, Proc, _GUARD, proc_start, start as start_guarded
from cpt_tui.redact import redact
from engine.gpus import problems
from engine.layout import RunLayout, StageLayout
from engine.spec import ClusterSpec, NodeSpec, StageSpec

# Copied from the manager: settings that mean the same on every machine. Not copied: names of the
# manager's own devices and interfaces (CUDA_VISIBLE_DEVICES, NCCL_SOCKET_IFNAME, ...) and library
# paths (LD_LIBRARY_PATH): give those per node in `nodes[i].env` (or cluster.env) if needed.
PROPAGATED_PREFIXES = ("NCCL_", "GLOO_", "TORCH_", "MASTER_", "FI_", "UCX_")
PROPAGATED_NAMES = ("HF_HOME", "PYTHONPATH")
MACHINE_SPECIFIC = ("NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "GLOO_SOCKET_IFNAME", "UCX_NET_DEVICES",
                    "NCCL_TOPO_FILE", "MASTER_ADDR")
SSH_MAIN_PORT = 29500  # the main process port on nodes[0] unless cluster.main_process_port says otherwise
PROGRESS_S = 2.0  # shared_fs false: a push's progress becomes a `progress` event at most this often per node
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
        return [*self._ssh_opts(node, name, extra), self._dest(node), "--"]

    @staticmethod
    def _dest(node: NodeSpec) -> str:
        return f"{node.user}@{node.host}" if node.user else node.host

    def _ssh_opts(self, node: NodeSpec, name: str, extra: Sequence[str] = ()) -> list[str]:
        """`ssh` and its options (no destination): also rsync's `-e`."""
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
        ds_path = stage_deepspeed(stage, total, run_dir, cpu=cpu, write=write_configs, node_local=not self.shared)
        if not self.shared:  # the node's copies (pushed by prepare_stage), relative to its workdir
            stage_json = sync.node_path(stage_json, run_dir)
            ds_path = ds_path and sync.node_path(ds_path, run_dir)
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
        if not self.shared and shutil.which("rsync") is None:
            bad.append("manager: rsync not found (cluster.shared_fs: false pushes and pulls with rsync); "
                       "install it (apt-get install rsync)")
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
        if not self.shared:
            try:
                r2 = subprocess.run([*prefix, "command -v rsync"], stdin=subprocess.DEVNULL, capture_output=True,
                                    text=True, timeout=timeout + 5)
            except subprocess.TimeoutExpired:
                return f"node {name}: checking for rsync timed out"
            if r2.returncode != 0:
                return (f"node {name}: rsync not found on {node.host} (cluster.shared_fs: false pushes and pulls "
                        f"with rsync); install it there (apt-get install rsync)")
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        try:
            return json.loads(lines[-1])
        except (IndexError, ValueError):
            return f"node {name}: the probe (python -m engine.doctor --json) printed no report: {_last_line(r.stdout)!r}"

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

    # ------------------------------------------------------------------ shared_fs: false
    # `notify(type, **data)`, if the supervisor set it: a manager-side event ('@run' stream), always
    # called on the supervisor's own thread (stream threads queue theirs in `self._notes`).
    notify = None

    @property
    def shared(self) -> bool:
        return getattr(self.cluster, "shared_fs", True)

    def _note(self, type: str, **data) -> None:
        if self.notify is not None:
            self.notify(type, **data)

    def _deliver(self) -> None:
        notes = getattr(self, "_notes", None)
        for kind, data in (notes.drain() if notes else ()):
            reason = data.pop("reason", None)
            self._note("status", state=f"node_{kind}", **data, **({"reason": reason} if reason else {}))

    def _rsync_dest(self, node: NodeSpec, rel: str) -> str:
        return f"{self._dest(node)}:{sync.rsync_path(node.workdir, rel)}"

    def _ssh_run(self, node: NodeSpec, name: str, script: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*self._ssh_prefix(node, name), script], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)

    def _stream_command(self, node: NodeSpec, name: str, rel: str, offset: int, once: bool) -> NodeCommand:
        args = ["-c", READER, rel, str(offset), "once" if once else "follow", MARK]
        return self._guarded_command(0, node, name, 2.0, args, [node.python, *args])

    def _node_items(self, layout: StageLayout, i: int) -> Path:
        """Write node i's stage JSON and its push tree (links to the inputs at their node paths)."""
        run_dir = str(layout.root.parent.parent)
        cfg = json.loads(layout.config.read_text())
        node_cfg, items = sync.stage_for_node(cfg, run_dir)
        layout.node_config(i).write_text(json.dumps(node_cfg, indent=1))
        items.append(sync.Item(str(layout.node_config(i)), sync.node_path(str(layout.config), run_dir)))
        ds = RunLayout(run_dir).deepspeed_config(layout.name)
        if ds.exists():
            items.append(sync.Item(str(ds), sync.node_path(str(ds), run_dir)))
        tree = layout.push_dir(i)
        shutil.rmtree(tree, ignore_errors=True)
        for it in items:
            link = tree / it.remote
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.abspath(it.local), link)
        return tree

    def push_commands(self, layout_root: str = "<run_dir>/stages/STAGE") -> list[str]:
        """The rsync / ssh commands of shared_fs false (for `plan --commands`)."""
        lines = []
        events = sync.node_path(f"{layout_root}/events.jsonl", str(Path(layout_root).parent.parent))
        final = sync.node_path(f"{layout_root}/final", str(Path(layout_root).parent.parent))
        for i, (node, name) in enumerate(zip(self.cluster.nodes, node_names(self.cluster))):
            e = sync.rsh(self._ssh_opts(node, name))
            tree = f"{layout_root}/.push/node-{i}/"
            lines.append(f"# {name}: push (content-keyed inputs under cache/, the stage JSON under runs/)")
            lines.append(shlex.join(["rsync", "-L", *sync.RSYNC_FLAGS, "-e", e, "--", tree,
                                     self._rsync_dest(node, "")]))
            if i == 0:
                lines.append(f"# {name}: stream rank 0's events (reconnects with backoff; resumes at the local size)")
                lines.append(f"{shlex.join(self._ssh_prefix(node, name))} <remote>\n    remote: " +
                             remote_script(node.workdir, {}, node.python, ["-c", placeholder("<guard>"), "2",
                                           remote_path(node.python), "-c", placeholder("<stream-reader>"), events,
                                           placeholder("OFFSET"), "follow"]))
                lines.append(f"# {name}: pull final/" + (" and checkpoints/" if self.cluster.pull_checkpoints else ""))
                lines.append(shlex.join(["rsync", *sync.RSYNC_FLAGS, "--delete", "-e", e, "--",
                                         self._rsync_dest(node, final + "/"), f"{layout_root}/final/"]))
            elif self.cluster.pull_checkpoints:
                lines.append(f"# {name}: pull checkpoints/ (this rank's own files)")
        return lines

    def describe(self, cmds: Sequence[NodeCommand], *, started: bool = False, attempt: int = 1) -> str:
        text = super().describe(cmds, started=started, attempt=attempt)
        if self.shared:
            return text
        return text + "\n\n# shared_fs: false — nothing is shared with the nodes:\n" + "\n".join(self.push_commands())

    def _disk(self, node: NodeSpec, name: str) -> tuple[int, int, Optional[str]]:
        """(free bytes in the node's workdir, bytes already in its cache/, None) or (0, 0, why not)."""
        script = (f"cd -- {_q(remote_path(node.workdir))} && df -Pk . | tail -n 1 && "
                  f"{{ du -sk {sync.CACHE_DIR} 2>/dev/null || echo 0; }}")
        try:
            r = self._ssh_run(node, name, script)
        except subprocess.TimeoutExpired:
            return 0, 0, f"node {name}: reading the free disk space in {node.workdir} timed out"
        lines = r.stdout.strip().splitlines()
        try:
            return int(lines[0].split()[3]) * 1024, int(lines[1].split()[0]) * 1024, None
        except (IndexError, ValueError):
            return 0, 0, (f"node {name}: cannot read the free disk space in {node.workdir}: "
                          f"{_last_line(r.stderr) or r.stdout.strip()}")

    def preflight_disk(self, preset, plan: dict) -> None:
        """Before data preparation: each node's free disk against a lower bound of what the run writes
        there (sync.planned_bytes: model, tokenizer, the planned token shards, the checkpoints kept; on
        rank 0's node also sync.final_bytes: the stages' exported models), less what the node's cache/
        already holds (it may be this run's inputs, sent by an earlier run)."""
        if self.shared:
            return
        common = sync.planned_bytes(preset, plan)
        nodes, names = self.cluster.nodes, node_names(self.cluster)
        with ThreadPoolExecutor(max_workers=min(8, len(nodes))) as ex:
            disks = list(ex.map(lambda i: self._disk(nodes[i], names[i]), range(len(nodes))))
        bad = []
        for i, (node, name, (free, cached, why)) in enumerate(zip(nodes, names, disks)):
            if why:
                bad.append(why)
                continue
            parts = {**common, "final models": sync.final_bytes(preset, plan)} if i == 0 else common
            need = sum(parts.values())
            detail = ", ".join(f"{k} {v}" for k, v in parts.items() if v)
            new = max(0, need - cached)
            if new > free:
                bad.append(f"node {name}: not enough disk in workdir {node.workdir}: the run needs at least {new} "
                           f"bytes there ({sync.human_bytes(new)}: {detail}"
                           + (f"; less {cached} bytes already in its cache/" if cached else "")
                           + f"), {free} bytes free (short by {new - free} bytes)")
        if bad:
            raise LaunchError("\n".join(bad))

    def prepare_stage(self, layout: StageLayout) -> None:
        """Push the stage's inputs to every node (after checking each node's free disk)."""
        if self.shared:
            return
        nodes, names = self.cluster.nodes, node_names(self.cluster)
        trees = [self._node_items(layout, i) for i in range(len(nodes))]
        # what each node lacks (rsync dry run) against its free disk
        need = [self._transfer(layout, i, trees[i], dry=True).transferred_size for i in range(len(nodes))]
        bad = []
        for i, (node, name) in enumerate(zip(nodes, names)):
            free, _cached, why = self._disk(node, name)
            if why:
                bad.append(why)
            elif need[i] > free:
                bad.append(f"node {name}: not enough disk in workdir {node.workdir}: {need[i]} bytes to push "
                           f"({sync.human_bytes(need[i])}), {free} bytes free (short by {need[i] - free} bytes)")
        if bad:
            raise LaunchError("\n".join(bad))
        latest: dict[str, str] = {}  # node → its push's latest progress line (written by the rsync threads)
        with ThreadPoolExecutor(max_workers=min(8, len(nodes))) as ex:
            futs = [ex.submit(self._transfer, layout, i, trees[i], latest=latest) for i in range(len(nodes))]
            while not wait(futs, timeout=PROGRESS_S).done.issuperset(futs):
                for name in names:  # on this (the supervisor's) thread: `progress` events (CLI, Events tab)
                    if name in latest:
                        self._note("progress", stage_name=layout.name, node=name, message=latest.pop(name))
            done = [f.result() for f in futs]
        for i, t in enumerate(done):
            rate = t.literal / t.seconds if t.seconds > 0 else 0.0
            self._note("transfer", op="push", stage_name=layout.name, node=names[i], bytes=t.literal,
                       size=t.total_size, changed=t.transferred_size, wire=t.sent, seconds=round(t.seconds, 3),
                       message=f"pushed {sync.human_bytes(t.literal)} to {names[i]} for {layout.name} "
                               f"({sync.human_bytes(t.total_size)} of inputs, {t.seconds:.1f} s, "
                               f"{sync.human_bytes(rate)}/s)")

    def _transfer(self, layout: StageLayout, i: int, tree: Path, dry: bool = False,
                  latest: Optional[dict] = None) -> sync.Transfer:
        node, name = self.cluster.nodes[i], node_names(self.cluster)[i]
        last = [0.0]

        def progress(done: int, pct: int, rate: str, eta: str) -> None:
            line = f"push {layout.name} → {name}: {sync.human_bytes(done)} ({pct}%), {rate}, ETA {eta}"
            if latest is not None:
                latest[name] = line  # prepare_stage turns the latest into an event every PROGRESS_S
            now = time.monotonic()
            if now - last[0] >= 1.0:  # at most one line a second (stdout: supervisor.log)
                last[0] = now
                print(line, flush=True)

        return sync.rsync(f"{tree}/", self._rsync_dest(node, ""), self._ssh_opts(node, name),
                          what=f"node {name}: push", extra=["-L", *(["--dry-run"] if dry else [])],
                          progress=None if dry else progress)

    def start(self, cmds: Sequence[NodeCommand], layout: StageLayout, attempt: int) -> list[Proc]:
        out = []
        with open(layout.log, "ab") as log:
            for c in cmds:
                p = start_guarded(c, stdout=log, stderr=subprocess.STDOUT)
                out.append(Proc(c.node, p.pid, proc_start(p.pid), time.time(), None, True, self.kind, p))
        if not self.shared and any(c.remote for c in cmds):
            self._start_stream(layout)
        return out

    def _event_stream(self, layout: StageLayout) -> EventStream:
        """The stream of rank 0's events.jsonl of this stage into the manager's copy (not started)."""
        node, name = self.cluster.nodes[0], node_names(self.cluster)[0]
        rel = sync.node_path(str(layout.events), str(layout.root.parent.parent))
        self._notes = getattr(self, "_notes", None) or Notes()

        def command(offset: int, once: bool) -> subprocess.Popen:
            return start_guarded(self._stream_command(node, name, rel, offset, once), stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL)

        return EventStream(name, str(layout.events), command, self._notes)

    def _start_stream(self, layout: StageLayout) -> None:
        self._stream = self._event_stream(layout).start()

    def catch_up_events(self, layout: StageLayout) -> None:
        """Before a new attempt: fetch what the previous attempt's rank 0 wrote after the last byte
        streamed here (a supervisor killed mid-stage had not copied it), so that it is ingested as the
        previous attempt's, not as the new one's."""
        if self.shared:
            return
        self._event_stream(layout).fetch_rest()
        self._deliver()

    def _finish_stream(self) -> None:
        st = getattr(self, "_stream", None)
        if st is not None:
            self._stream = None
            st.finish()
        self._deliver()

    def poll(self, procs: Sequence[Proc]) -> list[Optional[int]]:
        codes = [p.poll() for p in procs]
        if not self.shared:
            self._deliver()
            if None not in codes and getattr(self, "_stream", None) is not None:
                for p, c in zip(procs, codes):
                    if p.remote and c == 255:
                        self._note("status", state="node_disconnected", node=p.node,
                                   reason="the trainer's ssh channel was lost: the node's guard ended the "
                                          "trainer; the stage resumes from the node's latest checkpoint")
                self._finish_stream()  # everything rank 0 wrote is here before the supervisor's last read
        return codes

    def finish_stage(self, layout: StageLayout) -> None:
        """Pull final/ (from rank 0's node) and, with pull_checkpoints, each node's checkpoints."""
        if self.shared:
            return
        self._finish_stream()
        run_dir = str(layout.root.parent.parent)
        nodes, names = self.cluster.nodes, node_names(self.cluster)
        final = sync.node_path(str(layout.final), run_dir)
        t = sync.rsync(self._rsync_dest(nodes[0], final + "/"), f"{layout.final}/", self._ssh_opts(nodes[0], names[0]),
                       what=f"node {names[0]}: pull final/", extra=["--delete"], missing_ok=True)
        if t is not None:
            self._note("transfer", op="pull", stage_name=layout.name, node=names[0], bytes=t.literal,
                       size=t.total_size, seconds=round(t.seconds, 3),
                       message=f"pulled final/ of {layout.name} from {names[0]} ({sync.human_bytes(t.total_size)})")
        if self.cluster.pull_checkpoints:
            ck = sync.node_path(str(layout.checkpoints), run_dir)
            layout.checkpoints.mkdir(parents=True, exist_ok=True)
            for node, name in zip(nodes, names):
                sync.rsync(self._rsync_dest(node, ck + "/"), f"{layout.checkpoints}/", self._ssh_opts(node, name),
                           what=f"node {name}: pull checkpoints/", extra=["--exclude", ".tmp-*"], missing_ok=True)
