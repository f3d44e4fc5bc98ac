"""The Textual app. Reads SQLite only (in a worker thread); never imports torch; never owns training."""

from __future__ import annotations

import time
from pathlib import Path

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Header, Static

from cpt_tui.store import Store

REFRESH_S = 2.0
COLUMNS = ("run", "status", "preset", "stage", "step", "tokens", "loss", "tok/s", "started")


def _fmt(x, nd=3):
    if x is None:
        return "-"
    return f"{x:.{nd}f}" if isinstance(x, float) else f"{x:,}"


def run_rows(store: Store) -> list[tuple]:
    rows = []
    for r in store.runs():
        stages = store.stages(r["id"])
        cur = r["current_stage"] or 0
        st = stages[cur] if stages else {}
        rows.append((
            r["id"], r["status"], r["preset"], f"{cur + 1}/{r['n_stages']}",
            f"{st.get('step') or 0}/{st.get('steps_total') or '?'}", _fmt(st.get("tokens") or 0),
            _fmt(r["last_loss"]), _fmt(r["last_tps"], 0),
            time.strftime("%m-%d %H:%M", time.localtime(r["started"] or r["created"])),
        ))
    return rows


class CptApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "cpt-tui"
    BINDINGS = [Binding("q", "quit", "Quit", id="quit"), Binding("r", "refresh", "Refresh", id="refresh")]

    def __init__(self, db_path: Path):
        super().__init__()
        self.db_path = Path(db_path)
        self._loading = False

    def compose(self) -> ComposeResult:
        yield Header()
        table = DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        table.add_columns(*COLUMNS)
        yield table
        yield Static("", id="empty")
        yield Footer()

    def on_mount(self) -> None:
        self.action_refresh()
        self.set_interval(REFRESH_S, self.action_refresh)

    def action_refresh(self) -> None:
        if not self._loading:  # polls never overlap
            self._loading = True
            self.load_runs()

    @work(thread=True, exclusive=True)
    def load_runs(self) -> None:
        try:
            rows = []
            if self.db_path.exists():
                store = Store(self.db_path, readonly=True)
                try:
                    rows = run_rows(store)
                finally:
                    store.close()
            self.call_from_thread(self._show, rows)
        finally:
            self._loading = False

    def _show(self, rows: list[tuple]) -> None:
        table = self.query_one("#runs", DataTable)
        table.clear()
        for row in rows:
            table.add_row(*row, key=row[0])
        self.query_one("#empty", Static).update(
            "" if rows else "No runs yet. Start one with:  cpt-tui --run tiny-demo")


def run_app(db_path: Path) -> int:
    CptApp(db_path).run()
    return 0
