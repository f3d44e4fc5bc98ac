"""Run detail: stage timeline; loss (raw + EMA), LR, tokens/s and per-domain validation loss on a
step or tokens axis with stage boundaries; per-node telemetry sparklines; events; trainer log tail;
the benchmarks' forgetting table (tasks and validation domains × base model and stages)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rich.cells import cell_len
from rich.text import Text
from textual import events, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, VerticalScroll
from textual.widgets import DataTable, Header, Label, Static, TabbedContent, TabPane

from cpt_tui.benchmarks import ForgettingTable, cell_text, forgetting_table
from cpt_tui.fmt import fmt_si
from cpt_tui.store import TERMINAL, Store
from cpt_tui.ui.data import Curves, NodeTelemetry, ema, load_curves, log_tail, node_telemetry, recent_events
from cpt_tui.ui.plot import Chart, Series, sparkline
from cpt_tui.ui.widgets import STATUS_STYLE, KeysFooter, PollingScreen, stage_timeline

EMA_ALPHA = 0.1


@dataclass
class Detail:
    run: dict
    stages: list
    curves: Optional[Curves]
    events: list
    log: tuple[str, str]
    nodes: list[NodeTelemetry]
    bench: Optional[ForgettingTable] = None
    disconnected: Optional[dict] = None  # node → since (ts): its event stream / channel is down


class RunDetailScreen(PollingScreen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", id="detail.back"),
        Binding("x", "toggle_axis", "Step/tokens", id="detail.axis"),
        Binding("e", "toggle_ema", "EMA", id="detail.ema"),
        Binding("a", "attach", "Attach logs", id="detail.attach"),
        Binding("ctrl+x", "stop", "Stop run", id="detail.stop"),
    ]

    def __init__(self, run_id: str):
        super().__init__(id="detail-screen")
        self.run_id = run_id
        self.axis = "step"
        self.show_ema = True
        self.data: Optional[Detail] = None
        self._buckets = 400
        self.fetch_seconds = 0.0  # SQL time of the last poll (benchmark)
        self._texts: dict[str, Text] = {}  # what the Statics show (see _put)
        self._events: list = []  # what the events table shows
        self._telemetry_of: Optional[str] = None  # run whose sparklines are mounted
        self._telemetry_gen = 0
        self._styled_for: Optional[tuple] = None  # the app's CSS state the widgets' styles were computed in
        self._bench_of: Optional[str] = None  # run whose forgetting table is shown (see _read_bench)
        self._bench_for: Optional[Detail] = None  # shown without its forgetting table: read it when painted

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(self.run_id, id="run-title")
        yield Static("", id="timeline")
        with TabbedContent(id="tabs"):
            with TabPane("Curves", id="tab-curves"):
                with Grid(id="charts"):
                    yield Chart("train loss", id="chart-loss")
                    yield Chart("validation loss per domain", id="chart-val")
                    yield Chart("learning rate", id="chart-lr")
                    yield Chart("tokens/s", id="chart-tps")
            with TabPane("Telemetry", id="tab-telemetry"):
                yield VerticalScroll(Static("no telemetry recorded for this run", id="telemetry-empty"),
                                     id="telemetry")
            with TabPane("Events", id="tab-events"):
                table = DataTable(id="events", zebra_stripes=True, cursor_type="row")
                table.add_columns("time", "stream", "type", "details")
                yield table
            with TabPane("Log", id="tab-log"):
                yield VerticalScroll(Static("", id="log"), id="log-scroll")
            with TabPane("Benchmarks", id="tab-bench"):
                yield DataTable(id="forgetting", zebra_stripes=True, cursor_type="row")
                yield Static("no benchmark results: add a `benchmarks:` block to the preset, or run "
                             "`cpt-tui eval RUN`", id="forgetting-notes")
        yield KeysFooter()

    # ------------------------------------------------------------------ built once, shown many times
    def _css_state(self) -> tuple:
        return self.app._css_update_count, self.app.pseudo_classes

    def on_mount(self) -> None:
        self._styled_for = self._css_state()  # every widget was just styled
        super().on_mount()

    def _on_screen_resume(self, event: events.ScreenResume) -> None:
        # Runs before Textual's Screen._on_screen_resume, which restyles every widget on each push
        # (~25 ms of CPU for this screen: a third of a reopen's main-thread work). The styles can only
        # be stale if the app's CSS (theme, stylesheet: `_css_update_count`) or its pseudo-classes
        # (focus, dark/light) changed while the screen was not shown; changes within the screen
        # (classes, focus, hover) restyle their widgets as they happen.
        state = self._css_state()
        if event.refresh_styles and state == self._styled_for:
            event.refresh_styles = False
        self._styled_for = state

    def _compositor_refresh(self) -> None:
        # After a push Textual paints twice in one update: the layout pass sends the widgets that
        # changed (a partial frame over what the terminal shows, i.e. the previous screen), then the
        # repaint that the push requested sends the whole screen. When that full repaint is pending
        # (it always runs in the same Screen._on_timer_update, or the next one), the partial frame is
        # wasted work and a wrong frame: skip it.
        if self._repaint_required and not self.app.is_inline and self is self.app.screen:
            return
        super()._compositor_refresh()

    async def rehearse(self) -> None:
        """Lay out and render the screen once, off screen, at the app's size (call before it is first
        shown). The first show then costs what a reopen costs: the charts' canvases are sized, their
        legends placed and the widgets measured already, instead of in two extra layout and paint
        passes after the first frame. Best effort (it uses Textual internals): on any error the first
        show just does that work itself."""
        try:
            await self._drain()
            for _ in range(2):  # the second pass places what the first one sized (the legends)
                if self.is_current or not self.is_attached or not self.app._running:
                    return
                self._refresh_layout(self.app.size)  # not painted: the screen is not current
                await self._drain()
                self._compositor.render_update(full=True)  # widgets render: the charts size their canvases
                await self._drain()
        except Exception:
            pass

    async def _drain(self) -> None:
        """Wait until every widget of the screen has handled the messages posted to it so far."""
        done = []
        for node in self.walk_children(with_self=True):
            ev = asyncio.Event()
            if node.call_later(ev.set):
                done.append(ev.wait())
        if done:
            await asyncio.wait_for(asyncio.gather(*done), 2.0)

    def set_run(self, run_id: str) -> None:
        """Show another run (the screen is built once and reused: opening a run only reads data). The
        previous run's widgets are overwritten by the new data, or cleared if the screen is shown first."""
        if run_id == self.run_id:
            return
        self.run_id, self.data = run_id, None

    def _clear(self) -> None:
        self._put("#run-title", Text(self.run_id))
        self._put("#timeline", Text())
        for chart in self.query(Chart):
            chart.show([], ())
        self.query_one("#events", DataTable).clear()

    def resumed(self) -> None:
        d = self.data
        if d is None or d.run["id"] != self.run_id:
            self._clear()  # still showing the previous run
        else:
            if self._bench_for is not None:
                self.call_after_refresh(self._read_bench)
            if time.monotonic() - self.last_poll < 1.0:
                return  # just read before the screen was pushed (App.open_run)
        self.poll()

    def _put(self, selector: str, text: Text) -> None:
        """Update a Static, and the layout only if its height can change (not the case when the lines
        stay the same in number and all fit the width: a live run's title and timeline every poll)."""
        w = self.query_one(selector, Static)
        old = self._texts.get(selector)
        if old is not None and old == text:
            return
        self._texts[selector] = text
        width = w.size.width
        new_lines = text.plain.split("\n")
        old_lines = old.plain.split("\n") if old is not None else []
        same_height = (width > 0 and len(new_lines) == len(old_lines)
                       and all(cell_len(line) < width for line in new_lines + old_lines))
        w.update(text, layout=not same_height)

    # ------------------------------------------------------------------ data
    def prepare_poll(self) -> None:
        if self.is_mounted:
            w = self.query_one("#chart-loss", Chart).size.width
        else:  # read before the first push: about half the terminal
            w = self.app.size.width // 2 - 2
        self._buckets = max(100, min(1000, 2 * (w or 200)))

    def fetch(self, store: Store) -> Optional[Detail]:
        run = store.run(self.run_id)
        if run is None:
            return None
        old = self.data if self.data is not None and self.data.run["id"] == run["id"] else None
        if (old and old.run["status"] in TERMINAL and run["status"] == old.run["status"] and old.curves
                and old.bench is not None):
            return old  # a finished run does not change: nothing to redraw
        t0 = time.perf_counter()
        stages = store.stages(run["id"])
        curves = load_curves(store, run["id"], self._buckets)
        # The forgetting table reads every validation row of the run (Python-heavy: 2000 rows ~30 ms) for
        # a tab that is hidden when a run is opened: on a run's first read it comes right after the
        # first paint (_read_bench); later polls (a live run) read it with the rest.
        bench = _bench(store, run["id"], stages) if old is not None else None
        d = Detail(run, stages, curves, recent_events(store, run["id"]), log_tail(run, stages),
                   node_telemetry(store, run["id"]), bench, disconnected_nodes(store, run["id"]))
        self.fetch_seconds = time.perf_counter() - t0
        return d

    def show(self, d: Optional[Detail]) -> None:
        if d is None:
            self._put("#run-title", Text(f"run {self.run_id}: not found"))
            return
        if d.run["id"] != self.run_id:
            return  # a poll of the run shown before
        unchanged = d is self.data
        self.data = d
        if unchanged:
            return
        r = d.run
        title = Text()
        title.append(f"{r['id']}  ", style="bold")
        title.append(r["status"], style=STATUS_STYLE.get(r["status"], ""))
        title.append(f"  preset {r['preset']}  dir {r['run_dir']}")
        if r.get("error"):
            title.append(f"\nerror: {r['error'][:300]}", style="red")
        if r["status"] not in TERMINAL:
            for node, since in sorted((d.disconnected or {}).items()):
                title.append(f"\nnode {node}: disconnected since {time.strftime('%H:%M:%S', time.localtime(since))} "
                             "(reconnecting)", style="bold yellow")
        self._put("#run-title", title)
        self._put("#timeline", stage_timeline(d.stages))
        self.draw_curves()
        self._show_events(d.events)
        name, text = d.log
        self._put("#log", Text(f"== {name} ==\n{text}" if name else text))
        self._show_telemetry(d.nodes)
        if d.bench is not None or self._bench_of != self.run_id:
            self._bench_of = self.run_id if d.bench is not None else None
            show_forgetting(self.query_one("#forgetting", DataTable), self.query_one("#forgetting-notes", Static),
                            d.bench, pending=d.bench is None)
        self._bench_for = d if d.bench is None else None
        if self._bench_for is not None and self.is_current:
            self.call_after_refresh(self._read_bench)  # else when shown (resumed)

    def _read_bench(self) -> None:
        """Read the forgetting table of the run shown (after the frame that shows the run is painted)."""
        d, self._bench_for = self._bench_for, None
        if d is not None and d is self.data:
            self._bench_worker(self.app, d)

    @work(thread=True, exit_on_error=False, group="bench")
    def _bench_worker(self, app, d: Detail) -> None:
        bench = None
        try:
            if Path(app.db_path).exists():
                store = Store(app.db_path, readonly=True)
                try:
                    bench = _bench(store, d.run["id"], d.stages)
                finally:
                    store.close()
        finally:
            app.call_from_thread(self._bench_done, d, bench)

    def _bench_done(self, d: Detail, bench: Optional[ForgettingTable]) -> None:
        if d is not self.data or d.bench is not None:
            return  # another run, or a later poll, is shown
        d.bench = bench  # None (the read failed): the next poll reads it again
        self._bench_of = self.run_id if bench is not None else None
        show_forgetting(self.query_one("#forgetting", DataTable), self.query_one("#forgetting-notes", Static), bench)

    def draw_curves(self) -> None:
        if not self.data or not self.data.curves:
            return
        c = self.data.curves
        x = c.x(self.axis)
        marks = c.boundaries(self.axis)
        xl = "tokens seen" if self.axis == "tokens" else "step"
        loss = [Series("loss", x, c.loss, "grey50" if self.show_ema else None)]
        if self.show_ema and c.loss:
            # buckets are means of up to 32 rows; alpha per bucket keeps the smoothing comparable
            loss.append(Series(f"EMA {EMA_ALPHA:g}", x, ema(c.loss, EMA_ALPHA), "#4ea1ff"))
        self.query_one("#chart-loss", Chart).show(loss, marks, xl)
        self.query_one("#chart-lr", Chart).show([Series("lr", x, c.lr, "#ffb454")], marks, xl)
        self.query_one("#chart-tps", Chart).show([Series("tokens/s", x, c.tps, "#7bd88f")], marks, xl)
        val = [Series(d, xs[1] if self.axis == "tokens" else xs[0], xs[2]) for d, xs in sorted(c.evals.items())]
        self.query_one("#chart-val", Chart).show(val, marks, xl)

    def _show_events(self, events: list) -> None:
        table = self.query_one("#events", DataTable)
        if events == self._events and table.row_count == len(events):
            return
        self._events = events
        table.clear()
        for e in events:
            table.add_row(*e)
        table.move_cursor(row=max(0, table.row_count - 1))

    def _show_telemetry(self, nodes: list[NodeTelemetry]) -> None:
        box = self.query_one("#telemetry", VerticalScroll)
        if self._telemetry_of != self.run_id:  # the screen is reused: drop the previous run's rows
            self._telemetry_of = self.run_id
            self._telemetry_gen += 1  # new ids: the removal completes later
            box.query(".spark-row").remove()
        self.query_one("#telemetry-empty").display = not nodes
        for n in nodes:
            for metric, values in sorted(n.series.items()):
                wid = f"spark{self._telemetry_gen}-{_safe(n.node)}-{_safe(metric)}"
                label = f"{n.node} {metric}: {fmt_si(n.latest.get(metric))}"
                found = box.query(f"#{wid}")
                if found:
                    found.first().data = values[-120:]
                    lbl = self.query_one(f"#lbl-{wid}", Label)
                    if lbl.content != label:
                        lbl.update(label)
                else:
                    box.mount(Horizontal(Label(label, id=f"lbl-{wid}", classes="spark-label"),
                                         sparkline(values[-120:], id=wid), classes="spark-row"))

    # ------------------------------------------------------------------ actions
    def action_toggle_axis(self) -> None:
        self.axis = "tokens" if self.axis == "step" else "step"
        self.draw_curves()

    def action_toggle_ema(self) -> None:
        self.show_ema = not self.show_ema
        self.draw_curves()

    def action_attach(self) -> None:
        self.app.attach_logs(self.run_id)

    def action_stop(self) -> None:
        self.app.stop_run(self.run_id)


def disconnected_nodes(store: Store, run_id: str) -> dict:
    """Nodes whose last connection event (ssh `shared_fs: false`: the event stream, a trainer's channel)
    is `node_disconnected`, with its time; a later `node_connected` of the node, or a new stage attempt
    (`stage_started`), clears it."""
    down: dict = {}
    for e in store.events(run_id, 200, skip_types=("metric",)):
        state = e.data.get("state") if e.type == "status" else None
        if state == "node_disconnected" and e.data.get("node"):
            down.setdefault(e.data["node"], e.ts)
        elif state == "node_connected":
            down.pop(e.data.get("node"), None)
        elif state == "stage_started":
            down.clear()
    return down


def _bench(store: Store, run_id: str, stages: list) -> ForgettingTable:
    return forgetting_table(store.benchmarks(run_id), [s.name for s in stages], store.evals(run_id))


def show_forgetting(table: DataTable, notes: Static, t: Optional[ForgettingTable], pending: bool = False) -> None:
    """Fill a DataTable with a forgetting table: value (delta vs base-model), green better / red worse
    (`pending`: empty while it is being read)."""
    table.clear(columns=True)
    if pending:
        notes.update("reading benchmark results…")
        return
    if t is None or not t.rows:
        notes.update("no benchmark results: add a `benchmarks:` block to the preset, or run `cpt-tui eval RUN`")
        return
    table.add_columns("task", "metric", *t.columns)
    for i, (task, metric) in enumerate(t.rows):
        cells = []
        for j in range(len(t.columns)):
            text, better = cell_text(t.cells.get((i, j)))
            cells.append(Text(text, style="" if better is None else "green" if better else "red"))
        table.add_row(task, metric, *cells)
    lines = ["delta vs base-model (the first column with a value when it has none); green = better by the "
             "metric's direction; val:DOMAIN = last validation loss of each stage"]
    for (i, j), c in sorted(t.cells.items()):
        if c.failed:
            lines.append(f"{t.rows[i][0]} on {t.columns[j]} FAILED: {c.failed}")
    lim = {k: v for k, v in t.limits.items() if v is not None}
    if lim:
        lines.append("limited (smoke-test numbers): " + ", ".join(f"{k} {v:g}" for k, v in lim.items()))
    notes.update(Text("\n".join(lines)))


def _safe(s: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in s)
