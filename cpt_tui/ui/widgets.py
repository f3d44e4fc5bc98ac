"""Small shared widgets: polling base screen, stage timeline, confirmation dialog."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Checkbox, Footer, Label, Static

from cpt_tui.store import Store

STATUS_STYLE = {"done": "green", "running": "bold cyan", "failed": "bold red", "stopped": "yellow",
                "queued": "magenta", "pending": "grey50"}
STATUS_ICON = {"done": "✓", "running": "●", "failed": "✗", "stopped": "■", "queued": "…", "pending": "○"}


class PollingScreen(Screen):
    """A screen that reads SQLite in a worker thread every `POLL_S` seconds.

    Polls never overlap (a tick is skipped while one is in flight); `fetch` runs in the thread and
    returns plain data; `show` applies it on the event loop in one go (one coalesced update per poll).
    `poll(hidden=True, then=...)` fills a screen that is not shown yet (so it is pushed with its data,
    painted once; if it was never mounted, `show` runs in `on_mount`) and calls `then` on the event
    loop when done. The in-flight flag is only touched on the event loop.
    """

    POLL_S = 2.0

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self._inflight = False
        self._repoll = False
        self._after: list[Callable[[], None]] = []
        self.polls = 0  # completed polls (tests wait on it)
        self.last_poll = 0.0  # time.monotonic() of the last completed poll
        self._prefetched: tuple = ()  # (data,) read before the screen was mounted

    def on_mount(self) -> None:
        if self._prefetched:  # read before the screen was first pushed: show it in the first frame
            (data,) = self._prefetched
            self._prefetched = ()
            self._show(data)
        else:
            self.poll()
        self.set_interval(self.POLL_S, self.poll)

    def on_screen_resume(self) -> None:
        self.resumed()

    def resumed(self) -> None:
        """The screen is shown again (override to skip a poll whose data is fresh)."""
        self.poll()

    @property
    def in_view(self) -> bool:
        """On top, or under screens that let it show through (a modal dialog). Not `is_current`: that is
        also true of the screen right under the top one, opaque or not (the runs list under a run's
        detail would keep polling and repainting)."""
        stack = self.app.screen_stack
        if self not in stack:
            return False
        return all(s.styles.background.a < 1 for s in stack[stack.index(self) + 1:])

    def poll(self, *, hidden: bool = False, then: Optional[Callable[[], None]] = None) -> None:
        if not hidden and not self.in_view:  # hidden screens do not poll
            return
        if then is not None:
            self._after.append(then)
        if self._inflight:
            self._repoll = self._repoll or then is not None  # the poll in flight may read older state
            return
        self._inflight = True
        self.prepare_poll()
        self._poll_worker(self.app)

    def prepare_poll(self) -> None:
        """Runs on the event loop just before a poll (read widget sizes etc.)."""

    @work(thread=True, exit_on_error=False, group="poll")
    def _poll_worker(self, app) -> None:  # the app is passed in: `self.app` needs a mounted screen here
        data: Any = None
        ok = False
        try:
            db = app.db_path
            if Path(db).exists():
                store = Store(db, readonly=True)
                try:
                    data = self.fetch(store)
                finally:
                    store.close()
            ok = True
        finally:
            app.call_from_thread(self._poll_done, data, ok)

    def _poll_done(self, data: Any, ok: bool) -> None:
        self._inflight = False
        try:
            if ok:
                self.last_poll = time.monotonic()
                if self.is_mounted:
                    self._show(data)
                else:
                    self._prefetched = (data,)
        finally:
            if self._repoll:
                self._repoll = False
                self.poll(hidden=True)
            else:
                after, self._after = self._after, []
                for f in after:
                    f()

    def _show(self, data: Any) -> None:
        self.polls += 1
        self.show(data)

    def fetch(self, store: Store) -> Any:
        raise NotImplementedError

    def show(self, data: Any) -> None:
        raise NotImplementedError


class KeysFooter(Footer):
    """Textual's footer, rebuilt only when the keys it shows change. (Textual's rebuilds its dozen
    widgets whenever its screen is shown again or the focus moves: ~20 ms plus a relayout per open
    of the run detail, for the same keys.)"""

    _shown: Optional[tuple] = None

    def _keys(self) -> tuple:
        return (self.compact, self.show_command_palette,
                tuple((b.key, b.action, b.description, b.show, enabled, tooltip, self.app.get_key_display(b))
                      for _, b, enabled, tooltip in self.screen.active_bindings.values()))

    def compose(self) -> ComposeResult:
        self._shown = self._keys() if self._bindings_ready else None
        yield from super().compose()

    def bindings_changed(self, screen: Screen) -> None:
        if (self._shown is not None and screen.app.app_focus and self.is_attached and screen is self.screen
                and self._keys() == self._shown):
            return
        super().bindings_changed(screen)


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
