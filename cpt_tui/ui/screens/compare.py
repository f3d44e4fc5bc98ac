"""Compare runs: training loss (EMA) and mean validation loss of several runs on one chart each, and
their forgetting tables (benchmarks) side by side."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Header, Static

from cpt_tui.benchmarks import forgetting_table
from cpt_tui.ui.screens.detail import show_forgetting
from cpt_tui.ui.widgets import KeysFooter
from cpt_tui.store import Store
from cpt_tui.ui.data import ema, load_curves
from cpt_tui.ui.plot import Chart, Series


class CompareScreen(Screen):
    BINDINGS = [Binding("escape", "app.pop_screen", "Back", id="compare.back"),
                Binding("x", "toggle_axis", "Step/tokens", id="compare.axis")]

    def __init__(self, run_ids: list[str]):
        super().__init__()
        self.run_ids = run_ids
        self.axis = "step"
        self.curves: dict = {}

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("comparing " + ", ".join(self.run_ids), id="compare-title")
        yield Chart("train loss (EMA)", id="cmp-loss")
        yield Chart("validation loss (mean over domains)", id="cmp-val")
        with Horizontal(id="cmp-bench"):
            for i, rid in enumerate(self.run_ids):
                with Vertical(classes="cmp-bench-run"):
                    yield Static(rid, classes="cmp-bench-title")
                    yield DataTable(id=f"cmp-forgetting-{i}", zebra_stripes=True)
                    yield Static("", id=f"cmp-forgetting-notes-{i}")
        yield KeysFooter()

    def on_mount(self) -> None:
        self._load()

    @work(thread=True)
    def _load(self) -> None:
        store = Store(self.app.db_path, readonly=True)
        try:
            curves = {rid: load_curves(store, rid, 300) for rid in self.run_ids}
            bench = {rid: forgetting_table(store.benchmarks(rid), [s.name for s in store.stages(rid)],
                                           store.evals(rid)) for rid in self.run_ids}
        finally:
            store.close()
        self.app.call_from_thread(self._show, curves, bench)

    def _show(self, curves: dict, bench: dict) -> None:
        self.curves = curves
        self.draw()
        for i, rid in enumerate(self.run_ids):
            show_forgetting(self.query_one(f"#cmp-forgetting-{i}", DataTable),
                            self.query_one(f"#cmp-forgetting-notes-{i}", Static), bench.get(rid))

    def draw(self) -> None:
        loss, val = [], []
        for rid, c in self.curves.items():
            loss.append(Series(rid[-24:], c.x(self.axis), ema(c.loss, 0.1)))
            by_x: dict[float, list[float]] = {}
            for xs in c.evals.values():
                for sx, tx, l in zip(*xs):
                    by_x.setdefault(round(tx if self.axis == "tokens" else sx), []).append(l)
            xs = sorted(by_x)
            val.append(Series(rid[-24:], xs, [sum(by_x[k]) / len(by_x[k]) for k in xs]))
        xl = "tokens seen" if self.axis == "tokens" else "step"
        self.query_one("#cmp-loss", Chart).show(loss, (), xl)
        self.query_one("#cmp-val", Chart).show(val, (), xl)

    def action_toggle_axis(self) -> None:
        self.axis = "tokens" if self.axis == "step" else "step"
        self.draw()
