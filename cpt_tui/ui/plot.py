"""The one place the UI touches a plotting library: `Chart` (curves) and `sparkline` (telemetry).

Choice: **textual-plot** (`PlotWidget`) for the run curves, Textual's built-in `Sparkline` for
per-node telemetry.

Why textual-plot for curves: it draws on a hi-res canvas (braille, 2×4 dots per cell), so a
400-point downsampled loss curve stays legible in an 80-column pane; it has vertical lines
(`add_v_line`) for stage boundaries; it zooms and pans with keys and the mouse; it re-renders only
on change, and it is pure Textual (no plotext pin). textual-plotext pins plotext 5, re-renders slowly
and cannot zoom. The built-in `Sparkline` has no axes, no second series and no markers — fine for a
telemetry trend in one row, not for a loss curve with EMA, several validation domains and stage
boundaries. textual-plot converts every point in Python on each render, so the data it gets is
always downsampled first (in SQL, to about the widget's width: see `Store.metric_buckets`).

Everything else in the UI uses `Chart.show(...)` only, so swapping the library is a change here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from textual.widgets import Sparkline
from textual_plot import HiResMode, LegendLocation, PlotWidget

PALETTE = ("#4ea1ff", "#ffb454", "#7bd88f", "#ff6b81", "#c792ea", "#5ccfe6", "#f78c6c", "#d4d4d4")


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: Optional[str] = None  # a Rich colour; default: the palette in order


class Chart(PlotWidget):
    """A line chart: `show(series, markers)`; identical data is not redrawn (coalesced updates)."""

    DEFAULT_CSS = "Chart { height: 1fr; min-height: 8; }"

    def __init__(self, title: str = "", *, id: Optional[str] = None, classes: Optional[str] = None):
        super().__init__(id=id, classes=classes)
        self.title = title
        self._key = None
        self.labels: list[str] = []  # what is drawn (tests read it)
        self.markers: list[float] = []
        self.border_title = title

    def on_mount(self) -> None:
        super().on_mount()
        self.margin_top = 1
        self.margin_bottom = 2
        self.margin_left = 8

    def show(self, series: Sequence[Series], markers: Sequence[float] = (), xlabel: str = "") -> bool:
        """Replace what is drawn. Returns False (and draws nothing) when nothing changed."""
        key = (tuple((s.label, tuple(s.x), tuple(s.y)) for s in series), tuple(markers), xlabel)
        if key == self._key:
            return False
        self._key = key
        self.clear()
        self.labels = [s.label for s in series if len(s.x)]
        self.markers = list(markers)
        for i, s in enumerate(series):
            if len(s.x):
                self.plot(list(s.x), list(s.y), line_style=s.style or PALETTE[i % len(PALETTE)],
                          hires_mode=HiResMode.BRAILLE, label=s.label)
        for m in markers:
            self.add_v_line(m, line_style="grey50")
        self.set_xlabel(xlabel)
        if len(self.labels) > 1:
            self.show_legend(LegendLocation.TOPRIGHT)
        return True


def sparkline(values: Sequence[float], *, id: Optional[str] = None, classes: Optional[str] = None) -> Sparkline:
    return Sparkline(list(values), summary_function=max, id=id, classes=classes)
