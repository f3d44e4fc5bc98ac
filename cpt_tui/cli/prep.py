"""`cpt-tui prep PRESET`: data preparation alone, with a progress bar.

Preparation runs as `python -m engine.prepare` in a subprocess (this process never imports torch
or transformers) in `$CPT_TUI_HOME/prep/<preset>/`, against the shared cache: a later `--run`
of the same preset finds every source prepared. Exit codes: 0 ok, 2 bad data / invalid input,
1 anything else.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cpt_tui import paths
from cpt_tui.fmt import SI_PREFIXES, fmt_hms, fmt_si
from cpt_tui.presets import load_checked
from engine.layout import RunLayout


def _env(workers: int | None) -> dict:
    from cpt_tui.lifecycle import engine_env

    env = engine_env()
    if workers:
        env["CPT_PREP_WORKERS"] = str(workers)
    return env


def _si(x: float, unit: str = "") -> str:
    return fmt_si(x, unit, spec=".1f", prefixes=SI_PREFIXES[1:])  # one decimal, up to G


class ProgressBar:
    """One line per source: a bar over input bytes, bytes / documents / tokens per second and ETA."""

    def __init__(self, out=sys.stdout, width: int = 24):
        self.out, self.width = out, width
        self.tty = out.isatty()
        self._last_print = 0.0
        self._line = ""

    def update(self, r: dict) -> None:
        el = max(r.get("elapsed", 0.0), 1e-6)
        done, total = r.get("bytes", 0), max(r.get("total_bytes", 0), 1)
        frac = min(done / total, 1.0)
        bps = r.get("bytes_this_run", done) / el
        eta = (total - done) / bps if bps > 0 else 0
        fill = int(frac * self.width)
        rates = (f"{_si(r.get('documents', 0) / el)} docs/s  "
                 f"{_si(r.get('tokens_this_run', r.get('tokens', 0)) / el)} tok/s")
        if r.get("total_bytes"):
            self._line = (f"[{r['source']}] {'█' * fill}{'░' * (self.width - fill)} {frac:4.0%}  {_si(done, 'B')}/"
                          f"{_si(total, 'B')}  {_si(bps, 'B/s')}  {rates}  ETA {fmt_hms(eta)}")
        else:  # a built-in corpus: its size is not known in advance
            self._line = f"[{r['source']}] {r.get('documents', 0):,} documents  {rates}"
        now = time.time()
        if self.tty:
            self.out.write("\r" + self._line.ljust(120)[:160])
            self.out.flush()
        elif now - self._last_print >= 5:  # a log, not a terminal: a line every few seconds
            self._last_print = now
            print(self._line, file=self.out, flush=True)

    def message(self, text: str) -> None:
        if self.tty and self._line:
            self.out.write("\r" + " " * 160 + "\r")
        self._line = ""
        print(text, file=self.out, flush=True)


def cmd_prep(a) -> int:
    from engine.events import read_events

    path, preset, _ = load_checked(a.preset, check_paths=True)
    layout = RunLayout(paths.home() / "prep" / preset.name)  # laid out like a run directory
    prep_dir = layout.root
    prep_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, layout.preset)
    events = layout.prepare_events
    offset = events.stat().st_size if events.exists() else 0
    argv = [sys.executable, "-m", "engine.prepare", str(prep_dir), "--cache", str(paths.cache_dir())]
    bar = ProgressBar()
    t0 = time.time()
    failed_reason = None
    with open(layout.prepare_log, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_env(getattr(a, "workers", None)))
        try:
            while True:
                code = proc.poll()
                recs, offset = read_events(events, offset)
                for r in recs:
                    if r["type"] == "progress" and "total_bytes" in r:
                        bar.update(r)
                    elif r["type"] == "progress" and r.get("message"):
                        bar.message(r["message"])
                    elif r["type"] == "warning":
                        bar.message(f"warning: {r.get('message')}")
                    elif r["type"] == "status" and r.get("state") == "failed":
                        failed_reason = r.get("reason")
                if code is not None:
                    break
                time.sleep(0.2)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
    if code != 0:
        reason = failed_reason or _tail(layout.prepare_log)
        print(f"error: data preparation failed (exit {code}): {reason}", file=sys.stderr)
        return 2 if code == 2 else 1
    prepared = json.loads(layout.prepared.read_text())
    print(f"prepared {len(prepared['sources'])} source(s) in {time.time() - t0:.1f}s (cache {paths.cache_dir()})")
    print(f"  {'source':<24} {'train tokens':>16} {'val tokens':>12} {'documents':>12} {'skipped':>9}")
    for name, s in prepared["sources"].items():
        print(f"  {name:<24} {s['train_tokens']:>16,} {s['val_tokens']:>12,} {s['documents']:>12,} "
              f"{sum(s['skipped'].values()):>9,}")
    from engine.plan import PlanError, format_plan, resolve
    try:  # the mixture table with epochs; too little data for a step is a warning, the data is fine
        print("\n" + format_plan(resolve(preset, {n: s["train_tokens"] for n, s in prepared["sources"].items()},
                                         strict=False)))
    except PlanError as e:
        print(f"warning: plan: {e}", file=sys.stderr)
    return 0


def _tail(path: Path, n: int = 8) -> str:
    try:
        lines = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    return "\n" + "\n".join(lines[-n:])
