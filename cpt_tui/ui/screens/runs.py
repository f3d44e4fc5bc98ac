"""Runs (home): every run, live; sortable (s, or click a header), filterable (/); open, stop, resume,
attach logs, delete (with confirmation), mark runs to compare."""

from __future__ import annotations

from typing import Optional

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Header, Input, Static

from cpt_tui.store import Store
from cpt_tui.ui import actions
from cpt_tui.ui.data import RUN_COLUMNS, RunRow, run_rows
from cpt_tui.ui.widgets import STATUS_STYLE, ConfirmDelete, KeysFooter, PollingScreen


class RunsScreen(PollingScreen):
    BINDINGS = [
        Binding("enter", "open", "Open", id="runs.open"),
        Binding("x", "stop", "Stop", id="runs.stop"),
        Binding("u", "resume", "Resume", id="runs.resume"),
        Binding("a", "attach", "Logs", id="runs.attach"),
        Binding("d", "delete", "Delete", id="runs.delete"),
        Binding("space", "mark", "Mark", id="runs.mark"),
        Binding("c", "compare", "Compare", id="runs.compare"),
        Binding("s", "sort", "Sort", id="runs.sort"),
        Binding("slash", "filter", "Filter", id="runs.filter"),
        Binding("escape", "clear_filter", "Clear filter", show=False, id="runs.clear_filter"),
    ]

    def __init__(self):
        super().__init__(id="runs-screen")
        self.rows: list[RunRow] = []
        self.sort_col = 10  # started
        self.sort_reverse = True
        self.marked: set[str] = set()
        self._nodes_cache: dict = {}

    def compose(self) -> ComposeResult:
        yield Header()
        yield Input(placeholder="filter runs (status, preset, id…)", id="filter")
        table = DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        for i, c in enumerate(RUN_COLUMNS):
            table.add_column(c, key=str(i))
        yield table
        yield Static("", id="empty")
        yield KeysFooter()

    def on_mount(self) -> None:
        self.query_one("#runs", DataTable).focus()
        super().on_mount()

    # ------------------------------------------------------------------ data
    def fetch(self, store: Store) -> list[RunRow]:
        return run_rows(store, self._nodes_cache)

    def show(self, rows: Optional[list[RunRow]]) -> None:
        self.rows = rows or []
        self._render_rows()

    def visible(self) -> list[RunRow]:
        f = self.query_one("#filter", Input).value.strip().lower()
        rows = [r for r in self.rows if not f or all(w in " ".join(r.cells).lower() for w in f.split())]
        return sorted(rows, key=lambda r: r.sort[self.sort_col], reverse=self.sort_reverse)

    def _cells(self, r: RunRow) -> list:
        cells: list = list(r.cells)
        cells[0] = ("* " if r.id in self.marked else "") + r.id
        cells[1] = Text(r.status, style=STATUS_STYLE.get(r.status, ""))
        return cells

    def _render_rows(self) -> None:
        table = self.query_one("#runs", DataTable)
        rows = self.visible()
        keys = [r.id for r in rows]
        current = [rk.value for rk in table.rows]
        if keys == current:  # same rows in the same order: update changed cells only
            for r in rows:
                old = table.get_row(r.id)
                for i, v in enumerate(self._cells(r)):
                    if str(old[i]) != str(v):
                        table.update_cell(r.id, str(i), v)
        else:
            cursor = self.selected_id()
            table.clear()
            for r in rows:
                table.add_row(*self._cells(r), key=r.id)
            if cursor in keys:
                table.move_cursor(row=keys.index(cursor))
        for i, c in enumerate(RUN_COLUMNS):
            label = c + (" ▼" if self.sort_reverse else " ▲") if i == self.sort_col else c
            table.columns[list(table.columns)[i]].label = Text(label)
        table.refresh()
        empty = "No runs yet. Launch one (4), or run  cpt-tui --run tiny-demo" if not self.rows else (
            "" if rows else "No run matches the filter.")
        self.query_one("#empty", Static).update(empty)
        self.query_one("#empty", Static).display = bool(empty)

    def selected_id(self) -> Optional[str]:
        table = self.query_one("#runs", DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def selected(self) -> Optional[RunRow]:
        rid = self.selected_id()
        return next((r for r in self.rows if r.id == rid), None)

    # ------------------------------------------------------------------ events
    @on(Input.Changed, "#filter")
    def _filter_changed(self) -> None:
        self._render_rows()

    @on(Input.Submitted, "#filter")
    def _filter_done(self) -> None:
        self.query_one("#runs", DataTable).focus()

    @on(DataTable.RowSelected, "#runs")
    def _row_selected(self) -> None:
        self.action_open()

    @on(DataTable.HeaderSelected, "#runs")
    def _header(self, event: DataTable.HeaderSelected) -> None:
        col = int(event.column_key.value)
        self.sort_reverse = not self.sort_reverse if col == self.sort_col else False
        self.sort_col = col
        self._render_rows()

    # ------------------------------------------------------------------ actions
    def action_open(self) -> None:
        if rid := self.selected_id():
            self.app.open_run(rid)

    def action_sort(self) -> None:
        self.sort_col = (self.sort_col + 1) % len(RUN_COLUMNS)
        self.sort_reverse = False
        self.notify(f"sorted by {RUN_COLUMNS[self.sort_col]}", timeout=1.5)
        self._render_rows()

    def action_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def action_clear_filter(self) -> None:
        self.query_one("#filter", Input).value = ""
        self.query_one("#runs", DataTable).focus()

    def action_mark(self) -> None:
        if rid := self.selected_id():
            self.marked ^= {rid}
            self._render_rows()

    def action_compare(self) -> None:
        ids = [r.id for r in self.visible() if r.id in self.marked] or [r.id for r in self.visible()[:2]]
        if ids:
            self.app.compare(ids)

    def action_attach(self) -> None:
        if rid := self.selected_id():
            self.app.attach_logs(rid)

    def action_stop(self) -> None:
        if rid := self.selected_id():
            self.app.stop_run(rid)

    def action_resume(self) -> None:
        if rid := self.selected_id():
            self._resume(rid)

    @work(thread=True, group="action")
    def _resume(self, rid: str) -> None:
        try:
            msg = actions.resume_run(self.app.db_path, rid)
            self.app.call_from_thread(self.notify, f"{rid}: {msg}")
        except Exception as e:  # the message is for the user
            self.app.call_from_thread(self.notify, f"resume {rid}: {e}", severity="error")
        self.app.call_from_thread(self.poll)

    def action_delete(self) -> None:
        row = self.selected()
        if row is None:
            return

        def done(answer: Optional[bool]) -> None:
            if answer is not None:
                self._delete(row.id, answer)

        self.app.push_screen(ConfirmDelete(row.id, row.run_dir), done)

    @work(thread=True, group="action")
    def _delete(self, rid: str, with_files: bool) -> None:
        try:
            msg = actions.delete_run(self.app.db_path, rid, with_files)
            self.app.call_from_thread(self.notify, f"{rid}: {msg}")
        except Exception as e:
            self.app.call_from_thread(self.notify, f"delete {rid}: {e}", severity="error")
        self.marked.discard(rid)
        self.app.call_from_thread(self.poll)
