"""Notifications through apprise (one library, ~100 services: Slack, Discord, e-mail, ntfy, a plain
webhook — `json://host:port/path` POSTs JSON): a run of days tells you when it finishes or breaks.

URLs: the preset's `notify:` list, plus `cpt-tui --run PRESET --notify URL` (repeatable). Those reach
the supervisor in its environment (CPT_TUI_NOTIFY, never in SQLite: URLs carry tokens), which keeps
them in RUN_DIR/notify.json (mode 0600) for later supervisors of the run (resume, adoption).

One message per event, with run, stage, step and reason:
  stage_done      a stage finished                     run_done / run_stopped / run_failed
  nan             a non-finite loss (first one of a stage; the rest are in the run's events)
  loss_spike      a loss spike (first one of a stage)
  restart_limit   a stage crashed more often than max_restarts (the run failed: this message replaces
                  run_failed)
Messages are sent from a background thread: a slow or failing service never delays or affects the
run; a failed delivery becomes a `warning` event (kind `notify`) in the run's '@run' stream.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

ENV = "CPT_TUI_NOTIFY"  # newline-separated URLs from `--notify`, for the supervisor that starts the run
ONCE_PER_STAGE = ("nan", "loss_spike")
KINDS = ("stage_done", "run_done", "run_stopped", "run_failed", "restart_limit", "nan", "loss_spike")
_LEVEL = {"stage_done": "success", "run_done": "success", "run_stopped": "warning", "loss_spike": "warning",
          "run_failed": "failure", "restart_limit": "failure", "nan": "failure"}


@contextmanager
def passed_to_supervisor(urls: Optional[list[str]]):
    """`--notify URL...`: checked (apprise installed), then in the environment of the supervisor
    started inside this block — and of no other process started later."""
    if not urls:
        yield
        return
    import importlib.util

    from engine.errors import UserError

    if importlib.util.find_spec("apprise") is None:
        raise UserError("--notify needs apprise, which is not installed: pip install 'cpt-tui[notify]'")
    os.environ[ENV] = "\n".join(urls)
    try:
        yield
    finally:
        os.environ.pop(ENV, None)


def urls_for_run(preset_urls: list[str], run_dir: Path, env: Optional[dict] = None) -> list[str]:
    """The run's URLs: the preset's, and those of --notify (first from the environment, then kept in
    RUN_DIR/notify.json). Removes CPT_TUI_NOTIFY from `env` (engine processes must not inherit it)."""
    env = os.environ if env is None else env
    path = Path(run_dir) / "notify.json"
    extra = [u for u in (env.pop(ENV, "") or "").splitlines() if u.strip()]
    if extra:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(extra, f)
    elif path.exists():
        try:
            extra = json.loads(path.read_text())
        except (OSError, ValueError):
            extra = []
    return list(dict.fromkeys([*preset_urls, *extra]))


class Notifier:
    """Turns the supervisor's transitions and the trainers' events into messages, and sends them."""

    def __init__(self, urls: list[str], run_id: str, send=None):
        self.urls = list(urls)
        self.run_id = run_id
        self._send = send or self._apprise
        self.stage: Optional[str] = None
        self.steps: dict[str, int] = {}
        self._once: set[tuple[str, str]] = set()
        self.failures: "queue.Queue[str]" = queue.Queue()
        self._q: "queue.Queue[Optional[tuple]]" = queue.Queue()
        self._thread = threading.Thread(target=self._worker, name="notify", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ what happened
    def records(self, recs: list[dict]) -> None:
        """Trainer events as ingested: steps seen, NaN and loss-spike warnings."""
        for r in recs:
            stage = r.get("stage")
            if isinstance(r.get("step"), int):
                self.steps[stage] = r["step"]
            if r.get("type") == "warning" and r.get("kind") in ONCE_PER_STAGE:
                self.notify(r["kind"], stage, r.get("step"), r.get("message") or r["kind"])

    def run_event(self, type: str, data: dict) -> None:
        """A supervisor transition ('@run' stream status event)."""
        if type != "status":
            return
        state, stage = data.get("state"), data.get("stage_name")
        if stage:
            self.stage = stage
        if state == "stage_done":
            self.notify("stage_done", stage, self.steps.get(stage), f"stage {stage!r} finished")
        elif state in ("done", "stopped", "failed"):
            reason = data.get("reason") or {"done": "all stages finished"}.get(state, state)
            kind = "restart_limit" if state == "failed" and "restart limit" in reason else f"run_{state}"
            self.notify(kind, self.stage, self.steps.get(self.stage), reason)

    def notify(self, kind: str, stage: Optional[str], step: Optional[int], reason: str) -> None:
        if kind in ONCE_PER_STAGE:
            if (kind, stage) in self._once:
                return
            self._once.add((kind, stage))
        what = kind.replace("_", " ")
        title = f"cpt-tui: {what} — run {self.run_id}" + (f", stage {stage}" if stage else "")
        body = "\n".join([f"event: {kind}", f"run: {self.run_id}", f"stage: {stage or '-'}",
                          f"step: {step if step is not None else '-'}", f"reason: {reason[:1500]}"])
        self._q.put((kind, title, body))

    # ------------------------------------------------------------------ sending
    def _apprise(self, kind: str, title: str, body: str) -> bool:
        import apprise

        ap = apprise.Apprise()
        for u in self.urls:
            ap.add(u)
        if not len(ap):
            raise ValueError("no valid notification URL")
        return bool(ap.notify(title=title, body=body, notify_type=_LEVEL.get(kind, "info")))

    def _worker(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                try:
                    ok = self._send(*item)
                    if not ok:
                        self.failures.put(f"notification {item[0]!r} was not delivered to every service")
                except Exception as e:  # noqa: BLE001  (a notification never affects the run)
                    self.failures.put(f"notification {item[0]!r} failed: {type(e).__name__}: {e}")
            finally:
                self._q.task_done()

    def drain_failures(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.failures.get_nowait())
            except queue.Empty:
                return out

    def close(self, timeout: float = 30.0) -> None:
        """Send what is queued (at most `timeout` seconds), then stop the thread."""
        self._q.put(None)
        self._thread.join(timeout)


def for_run(preset, run_id: str, run_dir: Path) -> Optional[Notifier]:
    """The run's notifier, or None without URLs (or without apprise: then a failure message says so)."""
    urls = urls_for_run(list(getattr(preset, "notify", []) or []), run_dir)
    if not urls:
        return None
    n = Notifier(urls, run_id)
    try:
        import apprise  # noqa: F401
    except ImportError:
        n.failures.put("notifications need apprise: pip install 'cpt-tui[notify]' (none will be sent)")
        n._send = lambda *a: True
    return n
