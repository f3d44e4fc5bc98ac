"""The supervisor: one detached process per run, the store's only writer for its run.

    python -m cpt_tui.supervisor RUN_ID --db PATH [--fork]

It runs the plan — `python -m engine.prepare`, then each stage under `accelerate launch` — ingests
every events.jsonl into SQLite (idempotent, byte offset stored with the rows), stores node telemetry,
restarts a crashed stage (the trainer resumes from its own latest checkpoint) with backoff up to
`max_restarts`, stops gracefully on SIGTERM (`cpt-tui stop`: the trainer checkpoints and exits) and
records every transition as an event in the '@run' stream.

Surviving things:
- The supervisor runs in its own session with stdio in RUN_DIR/supervisor.log: closing the terminal
  that started it does nothing to it.
- Local trainers run in their own session too, under a tiny "keeper" (`_KEEPER`) that writes their
  exit status to a file, with stdin /dev/null. They are deliberately NOT under launch.py's guard (which
  ends the tree when its manager goes away): if the supervisor is killed, training goes on. Their pids
  and start times are in `stages.procs`; a new supervisor (`cpt-tui resume RUN`, or any `cpt-tui`
  start, see `adopt_orphans`) finds them still running, continues ingesting at the stored offset,
  reads their exit status from the file, then runs the remaining stages.
- SSH stages run under the guard on each node, so remote processes never outlive their ssh channel
  (no orphans on GPU nodes). If the supervisor dies, the channels close and the remote trainers end;
  the new supervisor relaunches the stage, which resumes from its last checkpoint (steps since that
  checkpoint are redone; this does not count as a restart). Events come back through a run directory
  shared with the nodes (same absolute path).

A run is orphaned when its status is 'running' but its supervisor is gone: same host → the recorded pid
is dead (or not a supervisor any more); another host → no heartbeat for STALE_S seconds.
"""

from __future__ import annotations

from engine.errors import CptError
import argparse
import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

from cpt_tui import launch
from cpt_tui.store import TERMINAL, Store
from engine.plan import PlanError, resolve, stage_config, stage_dir
from engine.spec import Preset, load_preset

RUN_STREAM = "@run"  # the supervisor's own events (stage names cannot start with '@')
POLL_S = 0.5  # events.jsonl polling
HEARTBEAT_S = 2.0
STALE_S = 60.0  # no heartbeat for this long (and no pid to check): the supervisor is gone
_ORIG_PYTHONPATH = "CPT_TUI_ORIG_PYTHONPATH"  # the starter's PYTHONPATH, for ssh nodes (see run())
LOST = -1  # exit code of a process that vanished without an exit status (kill -9 of its keeper)
ROOT = Path(__file__).resolve().parent.parent
SECRET_MIN_LEN = 4

DEFAULTS = {
    "max_restarts": 3,  # per stage; crashes beyond this mark the run failed
    "backoff": 10.0,  # seconds before restart n: backoff * 2**(n-1), at most 300
    "telemetry_interval": 2.0,  # seconds between telemetry samples; 0 disables telemetry
    "telemetry_retention": 3600.0,  # raw samples kept this long, older ones averaged per minute
    "stop_timeout": 600.0,  # after a stop request, SIGKILL what has not exited by then
}


class RunFailed(CptError):
    pass


class Stopped(Exception):
    pass


# --------------------------------------------------------------------------- processes


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


# The keeper: `python -c _KEEPER EXIT_FILE argv...`. Runs argv in its own process group (a stop is one
# killpg), ignores the stop signal itself, and once argv has exited AND nothing else is left in the
# group (`accelerate launch` dies at once on SIGTERM while the trainer is still saving its checkpoint),
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


def _read_exit(path: Optional[str]) -> Optional[int]:
    try:
        return int(Path(path).read_text()) if path else None
    except (OSError, ValueError):
        return None


@dataclass
class Proc:
    """A launched process as recorded in SQLite (`stages.procs`), so another supervisor can adopt it."""

    node: str
    pid: int
    start: Optional[int]
    launched: float
    exit_file: Optional[str] = None  # local keeper: its exit status lands here
    remote: bool = False
    popen: Optional[subprocess.Popen] = field(default=None, repr=False)  # only in the launching supervisor

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
                launch._signal(self.popen, sig)
            elif proc_alive(self.pid, self.start):
                os.killpg(self.pid, sig)  # the keeper leads its own group: keeper, accelerate, trainer
        except (ProcessLookupError, PermissionError):
            pass

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "popen"}


def procs_of(stage_row: dict) -> list[Proc]:
    return [Proc(**p) for p in json.loads(stage_row.get("procs") or "[]")]


# --------------------------------------------------------------------------- secrets


def secret_values(preset: Optional[Preset] = None, env=None) -> list[str]:
    """Values of secret-looking variables (…TOKEN…, …KEY…, …SECRET…, …PASSWORD…) that must never be
    written to SQLite or logs: from the environment and the preset's cluster / node env."""
    envs = [dict(os.environ if env is None else env)]
    if preset is not None:
        envs.append(preset.cluster.env)
        envs += [n.env for n in preset.cluster.nodes]
    vals = set()
    for e in envs:
        for k, v in e.items():
            if launch.redact({k: v})[k] == launch.REDACTED and v and len(v) >= SECRET_MIN_LEN:
                vals.add(v)
    return sorted(vals, key=len, reverse=True)


def scrub(text: str, secret_vals: list[str]) -> str:
    for v in secret_vals:
        text = text.replace(v, launch.REDACTED)
    return text


# --------------------------------------------------------------------------- telemetry


class Telemetry:
    """`python -m engine.telemetry` on each node (over ssh for remote nodes), read line by line."""

    RESTART_S = 30.0

    def __init__(self, cluster, interval: float, log, local_env):
        self.interval, self.log = interval, log
        self.cmds = launch.build_telemetry_commands(cluster, interval=interval, local_env=local_env)
        self.samples: "queue.Queue[dict]" = queue.Queue()
        self.procs: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}

    def _start(self, cmd: launch.NodeCommand) -> None:
        if not cmd.remote:
            cmd.env = {"PYTHONPATH": _engine_env()["PYTHONPATH"]}
        p = launch.start(cmd, stdout=subprocess.PIPE, stderr=self.log)
        self.procs[cmd.node], self.started[cmd.node] = p, time.monotonic()
        threading.Thread(target=self._read, args=(p,), daemon=True).start()

    def _read(self, p: subprocess.Popen) -> None:
        for line in p.stdout:
            try:
                self.samples.put(json.loads(line))
            except ValueError:
                pass

    def check(self) -> None:
        """(Re)start samplers that are not running (an ssh channel dropped), at most every RESTART_S."""
        for cmd in self.cmds:
            p = self.procs.get(cmd.node)
            if p is None or (p.poll() is not None and time.monotonic() - self.started[cmd.node] > self.RESTART_S):
                self._start(cmd)

    def drain(self) -> list[dict]:
        out = []
        while True:
            try:
                out.append(self.samples.get_nowait())
            except queue.Empty:
                return out

    def stop(self) -> None:
        launch.terminate(list(self.procs.values()), timeout=10, kill_after=2)


# --------------------------------------------------------------------------- the supervisor


class Supervisor:
    def __init__(self, store: Store, run_id: str):
        self.store = store
        self.run_id = run_id
        self.row = store.run(run_id)
        self.run_dir = Path(self.row["run_dir"])
        self.preset: Preset = load_preset(self.run_dir / "preset.yaml")
        self.opts = {**DEFAULTS, **json.loads(self.row.get("options") or "{}")}
        self.stop_requested = False
        self.secrets = secret_values(self.preset)
        self.telemetry: Optional[Telemetry] = None
        self._beat = self._downsampled = 0.0

    # ------------------------------------------------------------------ bookkeeping
    def log(self, msg: str) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {scrub(msg, self.secrets)}", flush=True)

    def event(self, type: str = "status", **data) -> None:
        data = {k: scrub(v, self.secrets) if isinstance(v, str) else v for k, v in data.items()}
        self.store.add_event(self.run_id, RUN_STREAM, type, **data)
        self.log(f"{type}: " + " ".join(f"{k}={v}" for k, v in data.items()))

    def claim(self) -> bool:
        """Become the run's supervisor unless a live one exists (atomic: BEGIN IMMEDIATE)."""
        db = self.store.db
        with db.conn:
            db.execute("BEGIN IMMEDIATE")
            row = self.store.run(self.run_id)
            if row["pid"] != os.getpid() and supervisor_alive(row):
                return False
            db.execute("UPDATE runs SET pid = ?, host = ?, heartbeat = ? WHERE id = ?",
                       [os.getpid(), socket.gethostname(), time.time(), self.run_id])
        self.previous = row
        return True

    def tick(self) -> None:
        """Called every poll: heartbeat, telemetry samples, downsampling."""
        now = time.time()
        if now - self._beat >= HEARTBEAT_S:
            self.store.update_run(self.run_id, heartbeat=now)
            self._beat = now
        if self.telemetry:
            self.telemetry.check()
            samples = self.telemetry.drain()
            if samples:
                self.store.add_telemetry(self.run_id, samples)
            if now - self._downsampled > 300:
                self.store.downsample_telemetry(self.run_id, now - self.opts["telemetry_retention"])
                self._downsampled = now

    def sleep(self, seconds: float) -> None:
        """Wait, still beating; a stop request ends the wait early."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self.stop_requested:
            self.tick()
            time.sleep(min(POLL_S, max(0.0, end - time.monotonic())))

    # ------------------------------------------------------------------ following processes
    def _follow(self, procs: list[Proc], events: Path, stage_idx: Optional[int], offset: int) -> int:
        """Ingest `events` while `procs` run; on a stop request SIGTERM them (they checkpoint), after
        stop_timeout SIGKILL. One process failing ends the others (multi-node). Returns the exit code."""
        stop_sent = None
        while True:
            codes = [p.poll() for p in procs]
            recs, raw, new = read_lines(events, offset)
            if recs or new != offset:
                self.store.ingest(self.run_id, recs, raw=raw, stage_idx=stage_idx,
                                  offset=new if stage_idx is not None else None)
                offset = new
            self.tick()
            if self.stop_requested and stop_sent is None:
                stop_sent = time.monotonic()
                self.log("stop requested: SIGTERM to the stage's processes")
                for p in procs:
                    if p.remote and p.popen is not None:
                        p.popen.stdin.close()  # the node's guard SIGTERMs the tree, then SIGKILLs after grace
                    else:
                        p.signal(signal.SIGTERM)
            if stop_sent is not None and time.monotonic() - stop_sent > self.opts["stop_timeout"]:
                for p in procs:
                    p.signal(signal.SIGKILL)
            failed = [c for c in codes if c not in (None, 0)]
            if failed and None in codes:  # one rank is gone: the others would hang in collectives
                self.log(f"a process exited with {failed[0]}: ending the others")
                live = [p.popen for p in procs if p.popen is not None and p.poll() is None]
                launch.terminate(live, timeout=30)
                for p in procs:
                    p.signal(signal.SIGTERM)
                continue
            if None not in codes:
                while True:  # everything they wrote, however much
                    recs, raw, new = read_lines(events, offset)
                    if new == offset:
                        return failed[0] if failed else 0
                    self.store.ingest(self.run_id, recs, raw=raw, stage_idx=stage_idx,
                                      offset=new if stage_idx is not None else None)
                    offset = new
            time.sleep(POLL_S)

    # ------------------------------------------------------------------ prepare
    def _prepare(self) -> dict:
        prepared = self.run_dir / "prepared.json"
        pidfile = self.run_dir / "prepare.pid"
        proc = None
        if pidfile.exists():  # a previous supervisor's: adopt it while it runs
            proc = Proc(**json.loads(pidfile.read_text()))
            if proc.poll() is not None:
                proc = None
        if prepared.exists() and proc is None:
            return json.loads(prepared.read_text())
        if proc is None:
            self.event(state="preparing")
            log = open(self.run_dir / "prepare.log", "ab")
            exit_file = str(self.run_dir / "prepare.exit")
            Path(exit_file).unlink(missing_ok=True)
            argv = [sys.executable, "-m", "engine.prepare", str(self.run_dir), "--cache", self.opts["cache"]]
            p = subprocess.Popen([sys.executable, "-c", _KEEPER, exit_file, *argv], stdout=log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_engine_env(),
                                 start_new_session=True)
            proc = Proc("local", p.pid, proc_start(p.pid), time.time(), exit_file, popen=p)
            pidfile.write_text(json.dumps(proc.to_json()))
        code = self._follow([proc], self.run_dir / "prepare" / "events.jsonl", None, 0)
        if self.stop_requested:
            raise Stopped("stopped during data preparation")
        if code != 0:
            raise RunFailed(f"data preparation failed (exit {code}): {self._tail(self.run_dir / 'prepare.log')}")
        return json.loads(prepared.read_text())

    # ------------------------------------------------------------------ stages
    def _launch(self, idx: int, prepared: dict) -> list[Proc]:
        st = self.preset.stages[idx]
        d = stage_dir(self.run_dir, st)
        d.mkdir(parents=True, exist_ok=True)
        try:
            cfg = stage_config(self.preset, idx, self.run_dir, prepared)
        except PlanError as e:
            raise RunFailed(str(e)) from None
        (d / "stage.json").write_text(json.dumps(cfg, indent=1))
        cluster = self.preset.cluster
        try:
            launch.preflight(cluster, local_env=self.env0)  # nodes can vanish between stages
            cmds = launch.build_commands(cluster, st, str(d / "stage.json"), str(self.run_dir), local_env=self.env0)
        except launch.LaunchError as e:
            raise RunFailed(str(e)) from None
        attempt = (self.store.stages(self.run_id)[idx]["attempts"] or 0) + 1
        self.event(state="stage_started", stage_name=st.name, attempt=attempt, commands=_display(cmds))
        log = open(d / "train.log", "ab")
        procs = []
        for i, c in enumerate(cmds):
            if c.remote:  # under the node's guard: ends with its ssh channel
                p = launch.start(c, stdout=log, stderr=subprocess.STDOUT)
                procs.append(Proc(c.node, p.pid, proc_start(p.pid), time.time(), None, True, p))
            else:  # the keeper, in its own session: outlives this supervisor
                exit_file = str(d / f"exit.{attempt}.{i}")
                p = subprocess.Popen([sys.executable, "-c", _KEEPER, exit_file, *c.launch], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**_engine_env(), **c.env}, start_new_session=True)
                procs.append(Proc(c.node, p.pid, proc_start(p.pid), time.time(), exit_file, False, p))
        self.store.update_stage(self.run_id, idx, status="running", attempts=attempt,
                                procs=json.dumps([p.to_json() for p in procs]),
                                started=self.store.stages(self.run_id)[idx]["started"] or time.time())
        self.store.update_run(self.run_id, current_stage=idx)
        return procs

    def _adopt(self, idx: int) -> Optional[list[Proc]]:
        """The stage's processes from a previous supervisor, if still running and adoptable."""
        procs = procs_of(self.store.stages(self.run_id)[idx])
        live = [p for p in procs if p.poll() is None]
        if not procs or (not live and all(p.remote for p in procs)):
            return None
        if any(p.remote for p in procs):
            # Their ssh channels belonged to the dead supervisor: the guards are ending them. Wait,
            # then relaunch (the trainer resumes from its last checkpoint).
            self.log(f"waiting for {len(live)} ssh process(es) of the previous supervisor to end")
            deadline = time.monotonic() + 60
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                self.sleep(1)
            for p in procs:
                p.signal(signal.SIGKILL)
            return None
        self.event(state="adopted", stage_name=self.preset.stages[idx].name,
                   pids=[p.pid for p in procs], running=len(live))
        return procs

    def _outcome(self, idx: int, procs: list[Proc]) -> tuple[Optional[str], Optional[str]]:
        """The trainer's own last status since this attempt began (accelerate turns exit 75 into 1)."""
        name = self.preset.stages[idx].name
        since = min(p.launched for p in procs)
        row = self.store.db.execute(
            "SELECT data FROM events WHERE run_id = ? AND stage = ? AND type = 'status' AND ts >= ? "
            "ORDER BY seq DESC LIMIT 1", [self.run_id, name, since - 1]).fetchone()
        data = json.loads(row[0]) if row else {}
        return data.get("state"), data.get("reason")

    def _stage(self, idx: int, prepared: dict) -> None:
        st = self.preset.stages[idx]
        d = stage_dir(self.run_dir, st)
        while True:
            procs = self._adopt(idx) or self._launch(idx, prepared)
            offset = self.store.stages(self.run_id)[idx]["events_offset"] or 0
            code = self._follow(procs, d / "events.jsonl", idx, offset)
            state, reason = self._outcome(idx, procs)
            self.store.update_stage(self.run_id, idx, exit_code=code, procs=None)
            if code == 0 and state == "done":
                self.store.update_stage(self.run_id, idx, status="done", finished=time.time())
                self.event(state="stage_done", stage_name=st.name)
                return
            if self.stop_requested:
                self.store.update_stage(self.run_id, idx, status="stopped")
                raise Stopped(f"stopped during stage {st.name!r}" + (" (checkpointed)" if state == "stopped" else ""))
            restarts = (self.store.stages(self.run_id)[idx]["restarts"] or 0) + 1
            why = {LOST: "the trainer vanished without an exit status (killed?)"}.get(code, f"exit {code}")
            if state == "failed" and reason:
                why += f": {reason}"
            elif state == "stopped":
                why += " (stopped by SIGTERM without a stop request)"
            if restarts > self.opts["max_restarts"]:
                self.store.update_stage(self.run_id, idx, status="failed", finished=time.time())
                raise RunFailed(f"stage {st.name!r} failed ({why}); restart limit {self.opts['max_restarts']} "
                                f"reached{self._tail(d / 'train.log')}")
            wait = min(300.0, self.opts["backoff"] * 2 ** (restarts - 1))
            ck = _latest_checkpoint(d / "checkpoints")
            self.store.update_stage(self.run_id, idx, restarts=restarts)
            self.event(state="restarting", stage_name=st.name, reason=why, restart=restarts,
                       max_restarts=self.opts["max_restarts"], backoff_s=wait,
                       resume_from=ck.name if ck else None)
            self.sleep(wait)
            if self.stop_requested:
                self.store.update_stage(self.run_id, idx, status="stopped")
                raise Stopped(f"stopped while waiting to restart stage {st.name!r}")

    def _tail(self, path: Path, n: int = 12) -> str:
        return scrub(_tail(path, n), self.secrets)

    # ------------------------------------------------------------------ the run
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # no terminal: ignore its hangup
        if not self.claim():
            self.log("another supervisor is alive for this run: exiting")
            return 3
        prev = self.previous
        if self.opts.get("cwd"):
            try:
                os.chdir(self.opts["cwd"])  # relative paths in the preset mean what they meant at --run
            except OSError:
                pass
        # What ssh nodes inherit (launch.PROPAGATED_*): the starting command's environment, without
        # the PYTHONPATH that spawn() added for this process.
        self.env0 = dict(os.environ)
        orig = self.env0.pop(_ORIG_PYTHONPATH, None)
        if orig is not None:
            self.env0.pop("PYTHONPATH", None)
            if orig:
                self.env0["PYTHONPATH"] = orig
        adopted = prev["status"] == "running"
        if prev["status"] in ("failed", "stopped"):  # `cpt-tui resume`: try again from checkpoints
            for s in self.store.stages(self.run_id):
                if s["status"] != "done":
                    self.store.update_stage(self.run_id, s["idx"], status="pending", restarts=0)
        self.store.update_run(self.run_id, status="running", error=None, finished=None,
                              started=prev["started"] or time.time())
        self.event(state="supervisor_started", pid=os.getpid(), host=socket.gethostname(),
                   resumed_from=prev["status"] if prev["status"] != "queued" else None, adopted=adopted)
        if self.opts["telemetry_interval"] > 0:
            self.telemetry = Telemetry(self.preset.cluster, self.opts["telemetry_interval"], sys.stdout, self.env0)
        try:
            prepared = self._prepare()
            plan = resolve(self.preset, {n: s["train_tokens"] for n, s in prepared["sources"].items()})
            self.store.update_run(self.run_id, plan=json.dumps(plan))
            for s in plan["stages"]:
                self.store.update_stage(self.run_id, s["index"], steps_total=s["steps"], tokens_total=s["tokens"])
            for s in self.store.stages(self.run_id):
                if s["status"] != "done":
                    self._stage(s["idx"], prepared)
        except Stopped as e:
            self._finish("stopped", str(e))
            return 0
        except RunFailed as e:
            self._finish("failed", str(e))
            return 1
        except Exception as e:  # a bug here: leave no trainer unsupervised
            self.log(traceback.format_exc())
            self._stop_all()
            self._finish("failed", f"supervisor error: {type(e).__name__}: {e}")
            return 1
        self._finish("done", None)
        return 0

    def _finish(self, status: str, reason: Optional[str]) -> None:
        if self.telemetry:
            self.telemetry.stop()
            self.store.add_telemetry(self.run_id, self.telemetry.drain())
        reason = scrub(reason, self.secrets) if reason else None
        self.store.update_run(self.run_id, status=status, error=reason if status == "failed" else None,
                              finished=time.time(), heartbeat=time.time())
        self.event(state=status, **({"reason": reason} if reason else {}))

    def _stop_all(self) -> None:
        for s in self.store.stages(self.run_id):
            for p in procs_of(s):
                p.signal(signal.SIGTERM)

    def _on_stop(self, *_):
        self.stop_requested = True


def _display(cmds: list[launch.NodeCommand]) -> str:
    """The commands as really run (local ones under the keeper, not the guard), secrets redacted."""
    shown = []
    for c in cmds:
        if not c.remote:
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in launch.redact(c.env).items())
            c = replace(c, display="<keeper> " + (env + " " if env else "") + shlex.join(c.launch))
        shown.append(c)
    text = launch.format_commands(shown)
    if not any(c.remote for c in cmds):
        text = text[:text.rindex("# <guard>")] + ("# <keeper>: cpt_tui.supervisor._KEEPER, which records the exit "
                                                  "status; the trainer outlives the supervisor")
    return text


def read_lines(path: Path, offset: int, limit: int = 8 << 20) -> tuple[list[dict], list[str], int]:
    """Like engine.events.read_events (complete lines from `offset`, at most `limit` bytes per call),
    also returning each record's line, stored as is."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(limit)
    except FileNotFoundError:
        return [], [], offset
    end = data.rfind(b"\n") + 1
    raw = [line for line in data[:end].decode().split("\n") if line.strip()]
    return [json.loads(line) for line in raw], raw, offset + end


def _latest_checkpoint(root: Path) -> Optional[Path]:
    done = sorted((p for p in root.glob("step-*") if (p / "trainer_state.json").exists()),
                  key=lambda p: int(p.name.split("-")[1]))
    return done[-1] if done else None


def _engine_env() -> dict:
    env = dict(os.environ)
    # The engine is importable from the project root even when cpt-tui is not installed there.
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
    return env


def _tail(path: Path, n: int = 12) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    lines = [l for l in lines if l.strip() and "it/s]" not in l]
    return "\n" + "\n".join(lines[-n:]) if lines else ""


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cpt_tui.supervisor", description="Supervise one run (detached).")
    ap.add_argument("run_id")
    ap.add_argument("--db", required=True)
    ap.add_argument("--fork", action="store_true",
                    help="fork, and exit once the child owns the run (0), or another supervisor does (3)")
    a = ap.parse_args(argv)
    if a.fork:
        r, w = os.pipe()
        if os.fork():  # the parent: report the child's claim, then exit so the child is reparented
            os.close(w)
            answer = os.read(r, 16)
            return {b"ok": 0, b"busy": 3}.get(answer, 1)
        os.close(r)
    store = Store(a.db)
    sup = Supervisor(store, a.run_id)
    if a.fork:
        # claim here so the parent can answer; run() claims again (a no-op: the pid is already ours)
        ok = sup.claim()
        os.write(w, b"ok" if ok else b"busy")
        os.close(w)
        if not ok:
            return 3
    return sup.run()


if __name__ == "__main__":
    sys.exit(main())
