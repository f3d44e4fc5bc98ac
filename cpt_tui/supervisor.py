"""The supervisor: runs one run's plan — preparation, then each stage under `accelerate launch` —
and ingests the engine's events.jsonl into SQLite. It is the store's only writer for its run.

preset → plan (engine.plan) → `python -m engine.prepare` → per stage `accelerate launch -m engine.train`
→ events.jsonl → Store.ingest → CLI / UI.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from cpt_tui import launch
from cpt_tui.paths import cache_dir, runs_dir
from cpt_tui.store import Store
from engine.events import read_events
from engine.plan import resolve, stage_config, stage_dir
from engine.spec import Preset, load_preset

RUN_STREAM = "@run"  # the supervisor's own events (stage names cannot start with '@')
POLL_S = 0.5


def new_run_id(preset: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{preset}-{secrets.token_hex(2)}"


class RunFailed(Exception):
    pass


class Supervisor:
    def __init__(self, store: Store, run_id: str, on_event: Optional[Callable[[dict], None]] = None):
        self.store = store
        self.run_id = run_id
        self.row = store.run(run_id)
        self.run_dir = Path(self.row["run_dir"])
        self.preset: Preset = load_preset(self.run_dir / "preset.yaml")
        self.on_event = on_event or (lambda r: None)

    # ------------------------------------------------------------------ creating
    @classmethod
    def create(cls, store: Store, preset_path: Path, preset: Preset, on_event=None) -> "Supervisor":
        run_id = new_run_id(preset.name)
        run_dir = runs_dir() / run_id
        run_dir.mkdir(parents=True)
        shutil.copyfile(preset_path, run_dir / "preset.yaml")
        store.create_run(run_id, preset.name, str(preset_path), str(run_dir), resolve(preset), socket.gethostname())
        return cls(store, run_id, on_event)

    # ------------------------------------------------------------------ running
    def _follow(self, proc: subprocess.Popen, events_path: Path, stage_idx: Optional[int]) -> int:
        """Ingest events while `proc` runs; returns its exit code."""
        offset = 0
        if stage_idx is not None:
            offset = self.store.stages(self.run_id)[stage_idx]["events_offset"] or 0
        while True:
            code = proc.poll()
            recs, offset = read_events(events_path, offset)
            if recs:
                self.store.ingest(self.run_id, recs)
                if stage_idx is not None:
                    last = [r for r in recs if r["type"] == "metric"]
                    fields = {"events_offset": offset}
                    if last:
                        fields.update(step=last[-1]["step"], tokens=last[-1]["tokens"])
                    self.store.update_stage(self.run_id, stage_idx, **fields)
                self.store.update_run(self.run_id, heartbeat=time.time())
                for r in recs:
                    self.on_event(r)
            if code is not None:
                return code
            time.sleep(POLL_S)

    def _prepare(self) -> dict:
        log = open(self.run_dir / "prepare.log", "ab")
        argv = [sys.executable, "-m", "engine.prepare", str(self.run_dir), "--cache", str(cache_dir())]
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_engine_env())
        code = self._follow(proc, self.run_dir / "prepare" / "events.jsonl", None)
        if code != 0:
            raise RunFailed(f"data preparation failed (exit {code}): {_tail(self.run_dir / 'prepare.log')}")
        return json.loads((self.run_dir / "prepared.json").read_text())

    def _stage(self, idx: int, prepared: dict) -> None:
        st = self.preset.stages[idx]
        d = stage_dir(self.run_dir, st)
        d.mkdir(parents=True, exist_ok=True)
        cfg = stage_config(self.preset, idx, self.run_dir, prepared)
        (d / "stage.json").write_text(json.dumps(cfg, indent=1))
        cmds = launch.build_commands(self.preset.cluster, st, str(d / "stage.json"), str(self.run_dir))
        self.store.update_stage(self.run_id, idx, status="running", started=time.time())
        self.store.update_run(self.run_id, current_stage=idx)
        self.store.add_event(self.run_id, RUN_STREAM, "status", state="stage_started", stage_name=st.name,
                             commands=launch.format_commands(cmds))
        log = open(d / "train.log", "ab")
        # Local trainers run in their own session, so they outlive this process and the terminal.
        procs = [subprocess.Popen(c.argv if c.remote else c.launch, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env={**_engine_env(), **c.env}, start_new_session=True)
                 for c in cmds]
        code = self._follow(procs[0], d / "events.jsonl", idx)
        for p in procs[1:]:
            code = code or p.wait()
        self.store.update_stage(self.run_id, idx, exit_code=code, finished=time.time(),
                                status="done" if code == 0 else "failed")
        if code != 0:
            raise RunFailed(f"stage {st.name!r} failed (exit {code}): {_tail(d / 'train.log')}")

    def run(self) -> int:
        self.store.update_run(self.run_id, status="running", started=time.time(), pid=os.getpid(),
                              heartbeat=time.time())
        try:
            prepared = self._prepare()
            plan = resolve(self.preset, {n: s["train_tokens"] for n, s in prepared["sources"].items()})
            self.store.update_run(self.run_id, plan=json.dumps(plan))
            for s in plan["stages"]:
                self.store.update_stage(self.run_id, s["index"], steps_total=s["steps"], tokens_total=s["tokens"])
            for idx in range(len(self.preset.stages)):
                self._stage(idx, prepared)
        except RunFailed as e:
            self.store.update_run(self.run_id, status="failed", error=str(e), finished=time.time())
            self.store.add_event(self.run_id, RUN_STREAM, "status", state="failed", reason=str(e))
            return 1
        self.store.update_run(self.run_id, status="done", finished=time.time())
        self.store.add_event(self.run_id, RUN_STREAM, "status", state="done")
        return 0


def _engine_env() -> dict:
    env = dict(os.environ)
    # The engine is importable from the project root even when cpt-tui is not installed there.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
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
