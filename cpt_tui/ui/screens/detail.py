"""Run detail: stage timeline; loss (raw + EMA), LR, tokens/s and per-domain validation loss on a
step or tokens axis with stage boundaries; per-node telemetry sparklines; events; trainer log tail."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, VerticalScroll
from textual.widgets import DataTable, Footer, Header, Label, Static, TabbedContent, TabPane

from cpt_tui.store import TERMINAL, Store
from cpt_tui.ui.data import (Curves, NodeTelemetry, ema, fmt_si, load_curves, log_tail,
                             node_telemetry, recent_events)
from cpt_tui.ui.plot import Chart, Series, sparkline
from cpt_tui.ui.widgets import STATUS_STYLE, PollingScreen, stage_timeline

EMA_ALPHA = 0.1


@dataclass
class Detail:
    run: dict
    stages: list
    curves: Optional[Curves]
    events: list
    log: tuple[str, str]
    nodes: list[NodeTelemetry]


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
        yield Footer()

    def set_run(self, run_id: str) -> None:
        """Show another run (the screen is built once and reused: opening a run only reads data)."""
        if run_id == self.run_id:
            return
        self.run_id, self.data = run_id, None
        if not self.is_mounted:
            return
        self.query_one("#run-title", Static).update(run_id)
        self.query_one("#timeline", Static).update("")
        for chart in self.query(Chart):
            chart.show([], ())
        self.query_one("#events", DataTable).clear()

    # ------------------------------------------------------------------ data
    def prepare_poll(self) -> None:
        w = self.query_one("#chart-loss", Chart).size.width
        self._buckets = max(100, min(1000, 2 * (w or 200)))

    def fetch(self, store: Store) -> Optional[Detail]:
        run = store.run(self.run_id)
        if run is None:
            return None
        old = self.data
        if old and old.run["id"] == run["id"] and old.run["status"] in TERMINAL and run["status"] == old.run["status"] and old.curves:
            return old  # a finished run does not change: nothing to redraw
        t0 = time.perf_counter()
        stages = store.stages(run["id"])
        curves = load_curves(store, run["id"], self._buckets)
        d = Detail(run, stages, curves, recent_events(store, run["id"]), log_tail(run, stages),
                   node_telemetry(store, run["id"]))
        self.fetch_seconds = time.perf_counter() - t0
        return d

    def show(self, d: Optional[Detail]) -> None:
        if d is None:
            self.query_one("#run-title", Static).update(f"run {self.run_id}: not found")
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
        self.query_one("#run-title", Static).update(title)
        self.query_one("#timeline", Static).update(stage_timeline(d.stages))
        self.draw_curves()
        self._show_events(d.events)
        name, text = d.log
        self.query_one("#log", Static).update(Text(f"== {name} ==\n{text}" if name else text))
        self._show_telemetry(d.nodes)

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
        if table.row_count == len(events) and events and table.get_row_at(table.row_count - 1)[3] == events[-1][3]:
            return
        table.clear()
        for e in events:
            table.add_row(*e)
        table.move_cursor(row=max(0, table.row_count - 1))

    def _show_telemetry(self, nodes: list[NodeTelemetry]) -> None:
        box = self.query_one("#telemetry", VerticalScroll)
        self.query_one("#telemetry-empty").display = not nodes
        for n in nodes:
            for metric, values in sorted(n.series.items()):
                wid = f"spark-{_safe(n.node)}-{_safe(metric)}"
                found = box.query(f"#{wid}")
                if found:
                    found.first().data = values[-120:]
                    self.query_one(f"#lbl-{wid}", Label).update(f"{n.node} {metric}: {fmt_si(n.latest.get(metric))}")
                else:
                    box.mount(Horizontal(Label(f"{n.node} {metric}: {fmt_si(n.latest.get(metric))}",
                                               id=f"lbl-{wid}", classes="spark-label"),
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


def _safe(s: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in s)
