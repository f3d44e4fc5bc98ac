"""Small shared widgets: polling base screen, stage timeline, confirmation dialog."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Optional

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Checkbox, Label, Static

from cpt_tui.store import Store

STATUS_STYLE = {"done": "green", "running": "bold cyan", "failed": "bold red", "stopped": "yellow",
                "queued": "magenta", "pending": "grey50"}
STATUS_ICON = {"done": "✓", "running": "●", "failed": "✗", "stopped": "■", "queued": "…", "pending": "○"}


class PollingScreen(Screen):
    """A screen that reads SQLite in a worker thread every `POLL_S` seconds.

    Polls never overlap (a tick is skipped while one is in flight); `fetch` runs in the thread and
    returns plain data; `show` applies it on the event loop in one go (one coalesced update per poll).
    """

    POLL_S = 2.0

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self._inflight = threading.Event()
        self.polls = 0  # completed polls (tests wait on it)

    def on_mount(self) -> None:
        self.poll()
        self.set_interval(self.POLL_S, self.poll)

    def on_screen_resume(self) -> None:
        self.poll()

    def poll(self) -> None:
        if self._inflight.is_set() or not self.is_current:  # hidden screens do not poll
            return
        self._inflight.set()
        self.prepare_poll()
        self._poll_worker()

    def prepare_poll(self) -> None:
        """Runs on the event loop just before a poll (read widget sizes etc.)."""

    @work(thread=True, exit_on_error=False, group="poll")
    def _poll_worker(self) -> None:
        try:
            db = self.app.db_path
            data: Any = None
            if Path(db).exists():
                store = Store(db, readonly=True)
                try:
                    data = self.fetch(store)
                finally:
                    store.close()
            self.app.call_from_thread(self._show, data)
        finally:
            self._inflight.clear()

    def _show(self, data: Any) -> None:
        self.polls += 1
        self.show(data)

    def fetch(self, store: Store) -> Any:
        raise NotImplementedError

    def show(self, data: Any) -> None:
        raise NotImplementedError


def stage_timeline(stages: list[dict]) -> Text:
    """`✓ base 96/96 ─▶ ● cpt-code 40/96 ─▶ ○ anneal -/120` coloured by status."""
    t = Text()
    for i, s in enumerate(stages):
        if i:
            t.append(" ─▶ ", style="grey50")
        st = s.get("status") or "pending"
        style = STATUS_STYLE.get(st, "")
        total = s.get("steps_total")
        step = s.get("steps_total") if st == "done" else s.get("step")
        t.append(f"{STATUS_ICON.get(st, '?')} {s['name']}", style=style)
        t.append(f" [{s.get('kind') or ''}] {step if step is not None else '-'}/{total if total is not None else '?'}",
                 style="dim" if st == "pending" else "")
    return t


class ConfirmDelete(ModalScreen[Optional[bool]]):
    """Asks before deleting a run. Dismisses with None (cancel), False (records only) or True (also
    the run directory, checkpoints included — only when the box is ticked)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="dialog.cancel")]

    def __init__(self, run_id: str, run_dir: str):
        super().__init__()
        self.run_id, self.run_dir = run_id, run_dir

    def compose(self) -> ComposeResult:
        with Grid(id="dialog"):
            yield Label(f"Delete run {self.run_id} from the database?", id="question")
            yield Checkbox(f"also delete {self.run_dir} (checkpoints and final model!)", False, id="with-files")
            with Horizontal(id="dialog-buttons"):
                yield Button("Delete", variant="error", id="confirm")
                yield Button("Cancel", variant="primary", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "confirm":
            self.dismiss(self.query_one("#with-files", Checkbox).value)
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class Note(Static):
    """A one-line status / error message."""

    def set(self, text: str, error: bool = False) -> None:
        self.update(Text(text, style="bold red" if error else ""))
