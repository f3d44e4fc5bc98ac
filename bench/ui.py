"""UI benchmark (not a test): time to open a run with 1M metric points, and the UI's CPU while idle
on a live run.

    python bench/ui.py [--points 1000000] [--idle 10]

Prints `ratio open/target = X` (target 0.3 s: Enter on the run's row in the runs list → the run-detail
screen painted with its four charts drawn from SQL-downsampled data; best of the reopens),
`ratio first_open/target` (the same for the first open after start-up) and `ratio idle_cpu/target = Y`
(target 5 % of one core while a simulated trainer appends a metric row every 0.5 s). An open is timed
to the frame that shows its content (see `_Frames`); the time until the app is idle again (the
Benchmarks tab's table is read after that frame, etc.) is printed as `settled`. The machine's load
average is printed too: on a shared box the wall-clock figures move with it, the CPU figure much less.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cpt_tui.store import Store  # noqa: E402
from cpt_tui.ui import sample_db  # noqa: E402
from cpt_tui.ui.data import load_curves  # noqa: E402

OPEN_TARGET_S = 0.3
IDLE_CPU_TARGET = 0.05


class _Frames:
    """Every frame the app paints, replayed on a virtual terminal: when a measured open *looks* done.

    The headless test driver writes nothing, so `App._display` is wrapped to do what it does for a real
    terminal (encode the update into escape sequences: `render_segments`, timed as part of the open) and
    to keep the update. A frame's content is its cells (character and style) after it is applied; an
    open is painted at the first frame from which the screen stays as it is when the app has settled."""

    def __init__(self, app) -> None:
        from textual.app import App

        self.app = app
        self.log: list[tuple[float, object]] = []  # (time the frame was encoded, the update)
        self._cells: dict[tuple[int, int], tuple] = {}  # the terminal before the first logged frame
        orig = App._display

        def display(app_, screen, renderable) -> None:
            if renderable is not None and app_ is self.app and hasattr(renderable, "render_segments"):
                renderable.render_segments(app_.console)  # what a real terminal costs on top
                self.log.append((time.perf_counter(), renderable))
            orig(app_, screen, renderable)

        self._orig = orig
        App._display = display

    def close(self) -> None:
        from textual.app import App

        App._display = self._orig

    def _apply(self, cells: dict, update) -> None:
        from rich.cells import cell_len
        from rich.segment import ControlType

        console = self.app.console
        x = y = 0
        for seg in update.__rich_console__(console, console.options):
            if seg.control:
                for code in seg.control:
                    if code[0] == ControlType.CURSOR_MOVE_TO:
                        x, y = code[1], code[2]
                continue
            if seg.text == "\n":
                x, y = 0, y + 1
                continue
            for ch in seg.text:
                cells[(x, y)] = (ch, seg.style)
                x += cell_len(ch)

    def start(self) -> None:
        """Forget the frames so far (applied to the terminal state) before a measured open."""
        for _, update in self.log:
            self._apply(self._cells, update)
        self.log.clear()

    def painted_at(self) -> Optional[float]:
        """Time of the first frame since `start` after which the terminal did not change any more."""
        states, cells = [], dict(self._cells)
        for t, update in self.log:
            self._apply(cells, update)
            states.append((t, dict(cells)))
        if not states:
            return None
        final = states[-1][1]
        first = len(states) - 1
        while first > 0 and states[first - 1][1] == final:
            first -= 1
        return states[first][0]


async def _open_times(db: Path, run_id: str, repeats: int) -> list[tuple[float, float, float]]:
    """(key press → painted, key press → settled, data seconds) of the first open and `repeats` reopens."""
    from cpt_tui.ui.app import CptApp
    from cpt_tui.ui.plot import Chart
    from textual.widgets import DataTable

    out = []
    app = CptApp(db, keymap={})
    async with app.run_test(size=(200, 50)) as pilot:
        frames = _Frames(app)
        try:
            await pilot.pause(0.5)
            # the app builds the detail screen and paints it off screen while idle after start-up
            # (CptApp._warm_detail, ~0.3 s): wait for that as a user's first keypress would, then time
            # the first open
            while not (app.is_screen_installed("detail") and app.get_screen("detail").is_mounted
                       and getattr(app, "detail_warm", True)):
                await asyncio.sleep(0.01)
            await pilot.pause(0.2)
            runs = app.screen
            table = runs.query_one("#runs", DataTable)

            async def press_open(rid: str):
                """Select the run's row in the runs list and press Enter, as a user does."""
                table.move_cursor(row=[table.get_row_at(i)[0] for i in range(table.row_count)].index(rid))
                await pilot.pause(0.2)
                frames.start()
                t0 = time.perf_counter()
                await pilot.press("enter")
                scr = await _drawn(app, pilot, rid)
                settled = time.perf_counter()
                await pilot.pause(0.3)  # any later frame counts too
                return t0, settled, scr

            for i in range(repeats + 1):
                # every open reuses the one detail screen (as the app does), so alternate with a small
                # run to make every measured reopen load the 1M-point run afresh
                if i:
                    await press_open(sample_db.DONE)
                    await pilot.press("escape")
                    await pilot.pause(0.2)
                t0, settled, scr = await press_open(run_id)
                painted = frames.painted_at()
                assert painted is not None, "nothing painted"
                out.append((painted - t0, settled - t0, scr.fetch_seconds))
                assert scr.query_one("#chart-loss", Chart).labels, "no curve drawn"
                await pilot.press("escape")
                await pilot.pause(0.2)
        finally:
            frames.close()
    return out


async def _drawn(app, pilot, run_id: str):
    """Wait until the detail screen shows `run_id` with data, then until the app is idle."""
    while True:
        scr = app.screen
        if getattr(scr, "data", None) is not None and scr.data.run["id"] == run_id:
            break
        await asyncio.sleep(0.002)
    await pilot.pause()
    return scr


async def _idle_cpu(db: Path, run_id: str, seconds: float) -> float:
    from cpt_tui.ui.app import CptApp

    app = CptApp(db, keymap={})
    async with app.run_test(size=(200, 50)) as pilot:
        await pilot.pause(1.0)
        app.open_run(run_id)
        await pilot.pause(2.0)
        c0, t0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        return (time.process_time() - c0) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measurement")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        t = time.perf_counter()
        run_id = sample_db.build_big(db, a.points)
        sample_db.build(db)  # small runs to alternate with
        print(f"built {a.points:,} metric rows in {time.perf_counter() - t:.1f} s")
        store = Store(db, readonly=True)
        t = time.perf_counter()
        curves = load_curves(store, run_id, 400)
        sql = time.perf_counter() - t
        store.close()
        print(f"SQL downsample: {len(curves.step)} points from {curves.points:,} rows in {sql * 1000:.0f} ms")
        times = asyncio.run(_open_times(db, run_id, a.repeats))
        first, times = times[0], times[1:]
        best = min(t for t, _, _ in times)
        print("times: Enter on the run's row → the detail screen painted with its content (the first frame "
              "from which the terminal stays as it is once the app is idle); settled = until idle")
        print(f"first open (screen built while idle after start-up): {first[0] * 1000:.0f} ms "
              f"(settled {first[1] * 1000:.0f} ms, data {first[2] * 1000:.0f} ms)")
        print("open run-detail: " + ", ".join(f"{t * 1000:.0f} ms (settled {s * 1000:.0f} ms, data {f * 1000:.0f} ms)"
                                              for t, s, f in times))
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"ratio open/target = {best / OPEN_TARGET_S:.2f}  (reopen, best of {a.repeats}: {best * 1000:.0f} ms, "
              f"target {OPEN_TARGET_S * 1000:.0f} ms)")
        print(f"ratio first_open/target = {first[0] / OPEN_TARGET_S:.2f}  (first open after start-up: "
              f"{first[0] * 1000:.0f} ms, target {OPEN_TARGET_S * 1000:.0f} ms)")

        live_db = Path(tmp) / "live.db"
        sample_db.build(live_db)
        writer = subprocess.Popen([sys.executable, "-m", "cpt_tui.ui.sample_db", "live", str(live_db),
                                   sample_db.LIVE, "0.5"], cwd=ROOT)
        try:
            cpu = asyncio.run(_idle_cpu(live_db, sample_db.LIVE, a.idle))
        finally:
            writer.terminate()
            writer.wait()
        print(f"idle on a live run: UI process CPU {cpu:.1%} of one core over {a.idle:g} s")
        print(f"ratio idle_cpu/target = {cpu / IDLE_CPU_TARGET:.2f}  (target {IDLE_CPU_TARGET:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
