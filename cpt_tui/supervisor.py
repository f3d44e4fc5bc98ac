"""The supervisor: one detached process per run, the store's only writer for its run.

    python -m cpt_tui.supervisor RUN_ID --db PATH [--fork]

It runs the plan — `python -m engine.prepare`, then each stage under `accelerate launch` through the
run's launch backend (cpt_tui/backends) — ingests every events.jsonl into SQLite (idempotent, byte
offset stored with the rows), stores node telemetry, restarts a crashed stage (the trainer resumes
from its own latest checkpoint) with backoff up to `max_restarts`, stops gracefully on SIGTERM
(`cpt-tui stop`: the trainer checkpoints and exits) and records every transition as an event in the
'@run' stream. This module is the state machine only; it never branches on the backend's kind.

Surviving things:
- The supervisor runs in its own session with stdio in RUN_DIR/supervisor.log: closing the terminal
  that started it does nothing to it.
- Data preparation and local trainers run under the keeper (cpt_tui/procs.py): they outlive a killed
  supervisor. Their pids and start times are recorded (RUN_DIR/prepare.pid, `stages.procs`); a new
  supervisor (`cpt-tui resume RUN`, or any `cpt-tui` start, see `lifecycle.adopt_orphans`) asks the
  backend to adopt them, continues ingesting at the stored offset, then runs the remaining stages.
- SSH stages run under the guard on each node and end with the dead supervisor's channels; the ssh
  backend's `adopt` waits for that and the stage is relaunched from its last checkpoint (steps since
  that checkpoint are redone; this does not count as a restart).

A run is orphaned when its status is 'running' but its supervisor is gone (`procs.supervisor_alive`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

from cpt_tui import notify
from cpt_tui.backends import Backend, LaunchError, backend_for
from cpt_tui.benchmarks import RunBenchmarks
from cpt_tui.collector import Telemetry, read_lines
from cpt_tui.procs import LOST, Proc, engine_env, procs_of, start_kept, starter_env, supervisor_alive, tail
from cpt_tui.redact import scrub, secret_values
from cpt_tui.store import Store
from engine.errors import CptError
from engine.layout import RunLayout, latest_checkpoint
from engine.plan import PlanError, resolve, stage_config
from engine.spec import Preset, load_preset

RUN_STREAM = "@run"  # the supervisor's own events (stage names cannot start with '@')
POLL_S = 0.5  # events.jsonl polling
HEARTBEAT_S = 2.0

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


class Supervisor:
    def __init__(self, store: Store, run_id: str):
        self.store = store
        self.run_id = run_id
        self.row = store.run(run_id)
        self.layout = RunLayout(self.row["run_dir"])
        self.run_dir = self.layout.root
        self.preset: Preset = load_preset(self.layout.preset)
        self.opts = {**DEFAULTS, **json.loads(self.row.get("options") or "{}")}
        self.stop_requested = False
        self.secrets = secret_values(self.preset)
        self.notifier = notify.for_run(self.preset, run_id, self.layout.root)  # None without notify URLs
        self.secrets += self.notifier.urls if self.notifier else []
        self.backend: Optional[Backend] = None  # built in run(), with the starter's environment
        self.telemetry: Optional[Telemetry] = None
        self._beat = self._downsampled = 0.0
        self.attempt = 1  # the running stage's launch number (stages.attempts): metric rows carry it

    # ------------------------------------------------------------------ bookkeeping
    def log(self, msg: str) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {scrub(msg, self.secrets)}", flush=True)

    def event(self, type: str = "status", **data) -> None:
        data = {k: scrub(v, self.secrets) if isinstance(v, str) else v for k, v in data.items()}
        self.store.add_event(self.run_id, RUN_STREAM, type, **data)
        self.log(f"{type}: " + " ".join(f"{k}={v}" for k, v in data.items()))
        if self.notifier:
            self.notifier.run_event(type, data)

    def claim(self) -> bool:
        """Become the run's supervisor unless a live one exists (atomic in the store)."""
        ok, self.previous = self.store.claim_run(self.run_id, os.getpid(), socket.gethostname(), supervisor_alive)
        return ok

    def tick(self) -> None:
        """Called every poll: heartbeat, telemetry samples, downsampling."""
        now = time.time()
        if now - self._beat >= HEARTBEAT_S:
            self.store.update_run(self.run_id, heartbeat=now)
            self._beat = now
            for msg in self.notifier.drain_failures() if self.notifier else ():
                self.event("warning", kind="notify", message=msg)
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

    def _tail(self, path: Path, n: int = 12) -> str:
        return scrub(tail(path, n), self.secrets)

    # ------------------------------------------------------------------ following processes
    def _ingest(self, events: Path, stage_idx: Optional[int], offset: int) -> int:
        """Store the complete event lines after `offset`; returns the new offset."""
        recs, raw, new = read_lines(events, offset)
        if recs or new != offset:
            self.store.ingest(self.run_id, recs, raw=raw, stage_idx=stage_idx,
                              offset=new if stage_idx is not None else None,
                              attempt=self.attempt if stage_idx is not None else 1)
            if self.notifier:
                self.notifier.records(recs)
        return new

    def _follow(self, procs: list[Proc], events: Path, stage_idx: Optional[int], offset: int) -> int:
        """Ingest `events` while `procs` run; on a stop request stop them gracefully (they checkpoint),
        after stop_timeout kill them. One process failing ends the others (multi-node). Returns the
        exit code once all have exited and every event line they wrote is stored."""
        stop_sent = None
        while True:
            codes = self.backend.poll(procs)
            if stage_idx is not None:
                self._note_scheduler(stage_idx, procs)
            offset = self._ingest(events, stage_idx, offset)
            self.tick()
            if self.stop_requested and stop_sent is None:
                stop_sent = time.monotonic()
                self.log("stop requested: SIGTERM to the stage's processes")
                self.backend.stop(procs)
            if stop_sent is not None and time.monotonic() - stop_sent > self.opts["stop_timeout"]:
                self.backend.stop(procs, force=True)
            failed = [c for c in codes if c not in (None, 0)]
            if failed and None in codes:  # one rank is gone: the others would hang in collectives
                self.log(f"a process exited with {failed[0]}: ending the others")
                self.backend.abort(procs)
                continue
            if None not in codes:
                while True:  # everything they wrote, however much
                    new = self._ingest(events, stage_idx, offset)
                    if new == offset:
                        return failed[0] if failed else 0
                    offset = new
            time.sleep(POLL_S)

    def _note_scheduler(self, idx: int, procs: list[Proc]) -> None:
        """Store the scheduler's view of the stage's job (e.g. PENDING (Resources)) when it changes."""
        st = self.backend.scheduler_state(procs)
        text = json.dumps(st, sort_keys=True) if st else None
        if text != getattr(self, "_scheduler", None):
            self._scheduler = text
            self.store.update_stage(self.run_id, idx, scheduler=text)

    # ------------------------------------------------------------------ prepare
    def _prepare(self) -> dict:
        """Data preparation, a local process under the keeper (adopted from a previous supervisor
        while it runs). Returns prepared.json."""
        lay = self.layout
        proc = None
        if lay.prepare_pid.exists():
            proc = Proc(**json.loads(lay.prepare_pid.read_text()))
            if proc.poll() is not None:
                proc = None
        if lay.prepared.exists() and proc is None:
            return json.loads(lay.prepared.read_text())
        if proc is None:
            self.event(state="preparing")
            argv = [sys.executable, "-m", "engine.prepare", str(self.run_dir), "--cache", self.opts["cache"]]
            with open(lay.prepare_log, "ab") as log:
                proc = start_kept(argv, str(lay.prepare_exit), log, engine_env())
            lay.prepare_pid.write_text(json.dumps(proc.to_json()))
        code = self._follow([proc], lay.prepare_events, None, 0)
        if self.stop_requested:
            raise Stopped("stopped during data preparation")
        if code != 0:
            raise RunFailed(f"data preparation failed (exit {code}): {self._tail(lay.prepare_log)}")
        return json.loads(lay.prepared.read_text())

    # ------------------------------------------------------------------ stages
    def _launch(self, idx: int, prepared: dict) -> list[Proc]:
        st = self.preset.stages[idx]
        sl = self.layout.stage(st.name)
        sl.root.mkdir(parents=True, exist_ok=True)
        try:
            cfg = stage_config(self.preset, idx, self.run_dir, prepared, init_from=self.opts.get("init_dir")
                               if idx == self.opts.get("from_stage") else None)
        except PlanError as e:
            raise RunFailed(str(e)) from None
        sl.config.write_text(json.dumps(cfg, indent=1))
        try:
            self.backend.preflight(stages=[st])  # nodes can vanish between stages
            cmds = self.backend.commands(st, str(sl.config), str(self.run_dir))
        except LaunchError as e:
            raise RunFailed(str(e)) from None
        attempt = (self.store.stages(self.run_id)[idx]["attempts"] or 0) + 1
        self.event(state="stage_started", stage_name=st.name, attempt=attempt,
                   commands=self.backend.describe(cmds, started=True, attempt=attempt))
        try:
            self.backend.prepare_stage(sl)  # nodes without a shared disk: push the stage's inputs
        except LaunchError as e:
            raise RunFailed(str(e)) from None
        procs = self.backend.start(cmds, sl, attempt)
        self.store.update_stage(self.run_id, idx, status="running", attempts=attempt,
                                procs=json.dumps([p.to_json() for p in procs]),
                                started=self.store.stages(self.run_id)[idx]["started"] or time.time())
        self.store.update_run(self.run_id, current_stage=idx)
        return procs

    def _adopt(self, idx: int) -> Optional[list[Proc]]:
        """The stage's processes from a previous supervisor, if the backend can re-attach to them."""
        procs = procs_of(self.store.stages(self.run_id)[idx])
        if not procs:
            return None
        procs = self.backend.adopt(procs, sleep=self.sleep, log=self.log)
        if procs:
            self.event(state="adopted", stage_name=self.preset.stages[idx].name,
                       pids=[p.pid for p in procs], running=sum(c is None for c in self.backend.poll(procs)))
        return procs

    def _outcome(self, idx: int, procs: list[Proc]) -> tuple[Optional[str], Optional[str]]:
        """The trainer's own last status since this attempt began (accelerate turns exit 75 into 1)."""
        return self.store.last_status(self.run_id, self.preset.stages[idx].name, min(p.launched for p in procs) - 1)

    def _stage(self, idx: int, prepared: dict) -> None:
        """Run stage `idx` to completion, restarting it after crashes (backoff, max_restarts)."""
        st = self.preset.stages[idx]
        sl = self.layout.stage(st.name)
        while True:
            row = self.store.stages(self.run_id)[idx]
            self.attempt = row["attempts"] or 1
            procs = self._adopt(idx)
            if not procs:  # what the previous attempt wrote after the stored offset is still its own
                if row["attempts"]:
                    self.backend.catch_up_events(sl)
                off = row["events_offset"] or 0
                while (new := self._ingest(self.backend.events_path(sl), idx, off)) != off:
                    off = new
                procs = self._launch(idx, prepared)
            self.attempt = self.store.stages(self.run_id)[idx]["attempts"] or 1
            ck0 = latest_checkpoint(sl.checkpoints)
            offset = self.store.stages(self.run_id)[idx]["events_offset"] or 0
            code = self._follow(procs, self.backend.events_path(sl), idx, offset)
            self.backend.finish_stage(sl)
            state, reason = self._outcome(idx, procs)
            self.store.update_stage(self.run_id, idx, exit_code=code, procs=None)
            if code == 0 and state == "done":
                self.store.update_stage(self.run_id, idx, status="done", finished=time.time())
                self.event(state="stage_done", stage_name=st.name)
                return
            if self.stop_requested:
                self.store.update_stage(self.run_id, idx, status="stopped")
                raise Stopped(f"stopped during stage {st.name!r}" + (" (checkpointed)" if state == "stopped" else ""))
            requeue = self.backend.requeue_reason(procs)
            ck = latest_checkpoint(sl.checkpoints)
            if requeue and ck is not None and ck != ck0:  # progress was saved: not a crash
                self.event(state="requeued", stage_name=st.name, reason=requeue, resume_from=ck.name)
                continue
            restarts = (self.store.stages(self.run_id)[idx]["restarts"] or 0) + 1
            why = {LOST: "the trainer vanished without an exit status (killed?)"}.get(code, f"exit {code}")
            if state == "failed" and reason:
                why += f": {reason}"
            elif state == "stopped":
                why += " (stopped by SIGTERM without a stop request)"
            elif state is None and (hint := self.backend.failure_reason(procs, sl)):
                why += f": {hint}"
            refused = state == "failed" and (reason or "").startswith("DeviceError")  # the node cannot: no retry
            if restarts > self.opts["max_restarts"] or refused:
                self.store.update_stage(self.run_id, idx, status="failed", finished=time.time())
                raise RunFailed(f"stage {st.name!r} failed ({why}); restart limit {self.opts['max_restarts']} "
                                f"reached{self._tail(sl.log)}")
            wait = min(300.0, self.opts["backoff"] * 2 ** (restarts - 1))
            ck = latest_checkpoint(sl.checkpoints)
            self.store.update_stage(self.run_id, idx, restarts=restarts)
            self.event(state="restarting", stage_name=st.name, reason=why, restart=restarts,
                       max_restarts=self.opts["max_restarts"], backoff_s=wait,
                       resume_from=ck.name if ck else None)
            self.sleep(wait)
            if self.stop_requested:
                self.store.update_stage(self.run_id, idx, status="stopped")
                raise Stopped(f"stopped while waiting to restart stage {st.name!r}")

    # ------------------------------------------------------------------ the run
    def _begin(self) -> None:
        """After the claim: mark the run running (resetting unfinished stages of a resumed run)."""
        prev = self.previous
        if self.opts.get("cwd"):
            try:
                os.chdir(self.opts["cwd"])  # relative paths in the preset mean what they meant at --run
            except OSError:
                pass
        # ssh nodes inherit (PROPAGATED_*) from the starting command's environment
        self.backend = backend_for(self.preset.cluster, local_env=starter_env(dict(os.environ)))
        self.backend.notify = self.event  # node/transfer events of a backend that has them (its own thread)
        if prev["status"] in ("failed", "stopped"):  # `cpt-tui resume`: try again from checkpoints
            for s in self.store.stages(self.run_id):
                if s["status"] not in ("done", "skipped"):
                    self.store.update_stage(self.run_id, s["idx"], status="pending", restarts=0)
        self.store.update_run(self.run_id, status="running", error=None, finished=None,
                              started=prev["started"] or time.time())
        self.event(state="supervisor_started", pid=os.getpid(), host=socket.gethostname(),
                   resumed_from=prev["status"] if prev["status"] != "queued" else None,
                   adopted=prev["status"] == "running")
        if self.opts["telemetry_interval"] > 0:
            self.telemetry = Telemetry(self.backend, self.opts["telemetry_interval"], sys.stdout)

    def _plan(self) -> None:
        """Data preparation, the resolved plan, then every stage not done yet, in order."""
        prepared = self._prepare()
        plan = resolve(self.preset, {n: s["train_tokens"] for n, s in prepared["sources"].items()})
        self.store.update_run(self.run_id, plan=json.dumps(plan))
        for s in plan["stages"]:
            self.store.update_stage(self.run_id, s["index"], steps_total=s["steps"], tokens_total=s["tokens"])
        bench = RunBenchmarks(self) if self.preset.benchmarks else None  # lm-eval, in its own process
        if bench:
            bench.reference(prepared)  # the starting model, once (skipped when recorded)
            if self.stop_requested:
                raise Stopped("stopped during the benchmarks of the base model")
        for s in self.store.stages(self.run_id):
            if s["status"] not in ("done", "skipped"):  # skipped: before --from-stage
                self._stage(s["idx"], prepared)
            if bench:
                bench.after_stage(s["name"])  # never fails the stage: failed tasks are recorded as such
                if self.stop_requested:
                    raise Stopped(f"stopped during the benchmarks of {s['name']!r}")

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # no terminal: ignore its hangup
        if not self.claim():
            self.log("another supervisor is alive for this run: exiting")
            return 3
        self._begin()
        try:
            self._plan()
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
        if self.notifier:  # the last message goes out before the supervisor exits
            self.notifier.close()
            for msg in self.notifier.drain_failures():
                self.event("warning", kind="notify", message=msg)

    def _stop_all(self) -> None:
        for s in self.store.stages(self.run_id):
            self.backend.stop(procs_of(s))

    def _on_stop(self, *_):
        self.stop_requested = True


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
