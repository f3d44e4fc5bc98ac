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
from math import floor
from typing import Optional, Sequence

from textual.app import ComposeResult, RenderResult
from textual.containers import Grid
from textual.geometry import Region
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import Sparkline
from textual_hires_canvas import Canvas
from textual_hires_canvas.hires import hires_sizes, pixels
from textual_plot import HiResMode, LegendLocation, PlotWidget
from textual_plot.plot_widget import Legend

PALETTE = ("#4ea1ff", "#ffb454", "#7bd88f", "#ff6b81", "#c792ea", "#5ccfe6", "#f78c6c", "#d4d4d4")


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: Optional[str] = None  # a Rich colour; default: the palette in order


class _Canvas(Canvas):
    """A Canvas, faster where a chart spends its time (same output):

    - painting: the style is computed once per render, not once per line (`Canvas.render_line` reads
      `rich_style`, which walks the widget's ancestors: a third of the cost of painting a chart);
    - drawing: `set_hires_pixels` collects each cell's sub-pixels as bits of an int, not in a numpy
      array allocated per cell (half of the cost of drawing a curve).

    This relies on textual-hires-canvas 0.14 internals (`_canvas_region`, `hires.hires_sizes`,
    `hires.pixels`, `render_line` reading `rich_style`); `Chart.compose` is `PlotWidget.compose` with
    these canvases."""

    _style_now = None

    @property
    def rich_style(self):
        style = self._style_now
        return style if style is not None else super().rich_style

    def render_lines(self, crop: Region) -> list[Strip]:
        self._style_now = self.rich_style
        try:
            return super().render_lines(crop)
        finally:
            self._style_now = None

    def set_hires_pixels(self, coordinates, hires_mode=None, style: str = "white") -> None:
        hires_mode = hires_mode or self.default_hires_mode
        size = hires_sizes[hires_mode]
        w, h = size.width, size.height
        chars = _cell_chars(hires_mode)
        x0, y0, cw, ch = self._canvas_region
        x1, y1 = x0 + cw, y0 + ch
        cells: dict[tuple[int, int], int] = {}  # cell → its sub-pixels set, bit (row * w + column)
        get = cells.get
        for x, y in coordinates:
            if not (x0 <= floor(x) < x1 and y0 <= floor(y) < y1):
                continue
            hx, hy = floor(x * w), floor(y * h)
            key = (hx // w, hy // h)
            cells[key] = get(key, 0) | 1 << ((hy % h) * w + hx % w)
        set_pixel = self.set_pixel
        for (cx, cy), bits in cells.items():
            if char := chars[bits]:
                set_pixel(cx, cy, char=char, style=style)


_CELL_CHARS: dict = {}


def _cell_chars(mode) -> list:
    """The character of each set of a cell's sub-pixels (bit i = sub-pixel i, row-major)."""
    chars = _CELL_CHARS.get(mode)
    if chars is None:
        size = hires_sizes[mode]
        n = size.width * size.height
        chars = _CELL_CHARS[mode] = [pixels[mode][tuple((b >> i) & 1 for i in range(n))] for b in range(1 << n)]
    return chars


class Chart(PlotWidget):
    """A line chart: `show(series, markers)`; identical data is not redrawn (coalesced updates).

    Drawing cost: `PlotWidget` draws its canvases from `render()`, i.e. while a frame is being
    composed, so they are painted again on the next frame; its legend (a Static) is rewritten, and
    the layout redone, by every `clear`/`plot`/`add_v_line`; it redraws on any style update. `show`
    therefore updates the legend once and only when it changes, and draws the canvases right away
    when their sizes are known (one refresh per canvas, painted in the next frame). This relies on
    textual-plot 0.10 internals (`_render_plot`, `_needs_rerender`, `_update_legend`); if they
    change, drawing falls back to PlotWidget's own path.
    """

    DEFAULT_CSS = "Chart { height: 1fr; min-height: 8; }"

    def __init__(self, title: str = "", *, id: Optional[str] = None, classes: Optional[str] = None):
        super().__init__(id=id, classes=classes)
        self.title = title
        self._key = None
        self._legend_key = None
        self._quiet_legend = False
        self._style_check = True
        self._style_key: Optional[tuple] = None
        self.labels: list[str] = []  # what is drawn (tests read it)
        self.markers: list[float] = []
        self.border_title = title

    def compose(self) -> ComposeResult:  # PlotWidget.compose with the faster canvases
        with Grid():
            yield _Canvas(1, 1, id="margin-top")
            yield _Canvas(1, 1, id="margin-left")
            yield _Canvas(1, 1, id="plot")
            yield _Canvas(1, 1, id="margin-bottom")
        yield Legend(id="legend")

    def on_mount(self) -> None:
        super().on_mount()
        self.margin_top = 1
        self.margin_bottom = 2
        self.margin_left = 8

    def show(self, series: Sequence[Series], markers: Sequence[float] = (), xlabel: str = "") -> bool:
        """Replace what is drawn. Returns False (and draws nothing) when nothing changed."""
        key = (tuple((s.label, tuple(s.x), tuple(s.y), s.style) for s in series), tuple(markers), xlabel)
        if key == self._key:
            return False
        self._key = key
        self._quiet_legend = True
        try:
            self.clear()
            self.labels = [s.label for s in series if len(s.x)]
            self.markers = list(markers)
            styles = []
            for i, s in enumerate(series):
                if len(s.x):
                    styles.append(s.style or PALETTE[i % len(PALETTE)])
                    self.plot(s.x, s.y, line_style=styles[-1], hires_mode=HiResMode.BRAILLE, label=s.label)
            for m in markers:
                self.add_v_line(m, line_style="grey50")
            self.set_xlabel(xlabel)
        finally:
            self._quiet_legend = False
        legend = (len(self.labels) > 1, tuple(zip(self.labels, styles)))
        if legend != self._legend_key:
            self._legend_key = legend
            if legend[0]:
                self.show_legend(LegendLocation.TOPRIGHT)
            else:
                self.show_legend(is_visible=False)
        if not self._draw_now():
            self.refresh()  # PlotWidget.render() draws
        return True

    def notify_style_update(self) -> None:
        # PlotWidget redraws everything on every style update (each time the screen is shown, on focus
        # and hover) and skips Widget's cache reset. Reset the caches; redraw only if the styles the
        # drawing uses changed (checked at render time: component styles are updated after this call).
        Widget.notify_style_update(self)
        self._style_check = True

    def render(self) -> RenderResult:
        if self._style_check:
            self._style_check = False
            key = tuple(str(self.get_component_rich_style(c)) for c in ("plot--axis", "plot--tick", "plot--label"))
            if key != self._style_key:
                self._style_key = key
                self._needs_rerender = True
        return super().render()

    def _update_legend(self) -> None:
        if not self._quiet_legend:
            super()._update_legend()

    def _rerender(self) -> None:
        if self._quiet_legend:  # inside show(): drawn at its end (the canvases repaint, not the frame)
            self._needs_rerender = True
        else:
            super()._rerender()

    def _render_plot(self) -> None:
        canvases = list(self.query(Canvas))
        before = [([r[:] for r in c._buffer], [r[:] for r in c._styles]) for c in canvases]  # some are drawn in place
        for c in canvases:  # one refresh per canvas that changed, not one per pixel
            c._refreshes_pending += 1
        try:
            super()._render_plot()
        finally:
            for c, old in zip(canvases, before):
                c._refreshes_pending -= 1
                if not c._refreshes_pending and (c._buffer, c._styles) != old:
                    c.refresh()

    def _draw_now(self) -> bool:
        """Draw on the canvases now if their sizes are settled (else `render()` will, after resizing) and
        the chart is not in a hidden tab (then `render()` will, when it is shown)."""
        if not getattr(self, "_needs_rerender", False) or getattr(self, "_needs_canvas_resize", True):
            return False
        if not self.is_mounted or not all(n.display for n in self.ancestors_with_self if isinstance(n, Widget)):
            return False
        canvases = list(self.query(Canvas))
        if not canvases or any(not c.size or getattr(c, "_canvas_size", None) != c.size for c in canvases):
            return False
        self._render_plot()
        self._needs_rerender = False
        return True


def sparkline(values: Sequence[float], *, id: Optional[str] = None, classes: Optional[str] = None) -> Sparkline:
    return Sparkline(list(values), summary_function=max, id=id, classes=classes)
