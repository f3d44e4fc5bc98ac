"""The Textual app. Reads SQLite only (in worker threads); never imports torch; never owns training.

Screens (modes, keys 1–5): Runs (home; run detail, logs and compare on top of it), Mixture builder,
Stage plan, Launch, Nodes. Every binding has an id: remap them in `$CPT_TUI_HOME/keymap.yaml`
(`runs.stop: ctrl+k`, or `CPT_TUI_KEYMAP=path`). Theme: `CPT_TUI_THEME` or the palette's "theme".
"""

from __future__ import annotations

import asyncio
import gc
import os
from pathlib import Path
from typing import Optional

import yaml
from textual import work
from textual.app import App
from textual.binding import Binding
from textual.screen import Screen

from cpt_tui import paths
from cpt_tui.ui.draft import Draft
from cpt_tui.ui.palette import CptCommands
from cpt_tui.ui.screens.compare import CompareScreen
from cpt_tui.ui.screens.detail import RunDetailScreen
from cpt_tui.ui.screens.launch import LaunchScreen
from cpt_tui.ui.screens.logs import LogScreen
from cpt_tui.ui.screens.mixture import MixtureScreen
from cpt_tui.ui.screens.nodes import NodesScreen
from cpt_tui.ui.screens.plan import PlanScreen
from cpt_tui.ui.screens.runs import RunsScreen

DEFAULT_PRESET = "tiny-demo"


def load_keymap() -> dict[str, str]:
    """Binding id → keys, from CPT_TUI_KEYMAP or $CPT_TUI_HOME/keymap.yaml (absent: no remapping)."""
    p = Path(os.environ.get("CPT_TUI_KEYMAP") or paths.home() / "keymap.yaml")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


class CptApp(App):
    CSS_PATH = ["app.tcss", "runs.tcss", "detail.tcss", "editors.tcss"]
    TITLE = "cpt-tui"
    COMMANDS = App.COMMANDS | {CptCommands}
    MODES = {"runs": RunsScreen, "mixture": MixtureScreen, "plan": PlanScreen, "launch": LaunchScreen,
             "nodes": NodesScreen}
    MODE_LABELS = {"runs": "Runs", "mixture": "Mixture builder", "plan": "Stage plan", "launch": "Launch",
                   "nodes": "Nodes"}
    BINDINGS = [
        Binding("q", "quit", "Quit", id="app.quit"),
        Binding("f1,1", "switch_mode('runs')", "Runs", id="app.runs"),
        Binding("f2,2", "switch_mode('mixture')", "Mixture", id="app.mixture"),
        Binding("f3,3", "switch_mode('plan')", "Stages", id="app.plan"),
        Binding("f4,4", "switch_mode('launch')", "Launch", id="app.launch"),
        Binding("f5,5", "switch_mode('nodes')", "Nodes", id="app.nodes"),
    ]

    OPEN_WAIT_S = 0.25  # longest wait for a run's data before its detail screen is shown anyway

    def __init__(self, db_path: Path, *, preset: Optional[str] = None, keymap: Optional[dict] = None):
        super().__init__()
        self.db_path = Path(db_path)
        self.draft: Optional[Draft] = None
        self._preset = preset
        self._keymap = load_keymap() if keymap is None else keymap
        self._opening: Optional[str] = None  # run whose detail waits for its data before being shown
        self._frozen = False  # gc.freeze() done (see _freeze_heap)
        self.detail_warm = False  # the detail screen is built and rehearsed (benchmarks wait for it)
        self._warming = None  # the worker doing that
        theme = os.environ.get("CPT_TUI_THEME")
        if theme:
            self.theme = theme

    def on_mount(self) -> None:
        if self._keymap:
            self.set_keymap(self._keymap)
        try:
            self.load_draft(self._preset or DEFAULT_PRESET)
        except Exception:
            self.draft = None
        self.switch_mode("runs")
        # Build the run-detail screen while the app is idle: its first open then costs what a reopen
        # costs (reading the run and painting), not also composing and styling ~30 widgets.
        self.call_after_refresh(self._warm_detail)

    def _warm_detail(self) -> None:
        if self.is_screen_installed("detail"):  # a run was opened first
            self._freeze_heap()
            self.detail_warm = True
            return
        detail = RunDetailScreen("")
        self.install_screen(detail, "detail")
        _, mounted = self._get_screen("detail")  # Textual: registers the screen (compose + mount), not pushed
        self._warming = self.run_worker(self._rehearse(detail, mounted), name="warm-detail", group="warm",
                                        exit_on_error=False)

    async def _rehearse(self, detail: RunDetailScreen, mounted) -> None:
        """Then lay it out and render it off screen (RunDetailScreen.rehearse), then freeze the heap."""
        try:
            await mounted
            await detail.rehearse()
        finally:
            self._freeze_heap()
            self.detail_warm = True

    def _freeze_heap(self) -> None:
        """Move the objects of start-up (imports, widgets, styles: ~10^5) out of the garbage collector's
        sight. Otherwise its first full collections, due soon after start-up, scan them all (~100 ms of
        CPU each, twice) and land in the first open of a run. Unfrozen when the app exits."""
        if not self._frozen:
            self._frozen = True
            gc.freeze()

    async def _close_all(self) -> None:
        # Textual prunes the screens on its stacks (each widget closes after its children, having
        # handled its pending messages) but closes an installed screen that is on no stack (the warm
        # run-detail) node by node in no order: a widget still handling a message when its children are
        # gone raises at exit ("No Tab with id ...", "No nodes match 'HeaderTitle'": the app quit while
        # that screen was still mounting). Let it finish mounting, then prune it the same way.
        if self._warming is not None and not self._warming.is_finished:
            self._warming.cancel()  # no more layout passes on a screen being closed
            try:
                await asyncio.wait_for(self._warming.wait(), 2.0)
            except Exception:
                pass
        stacked = {s for stack in self._screen_stacks.values() for s in stack}
        for screen in list(self._installed_screens.values()):
            if isinstance(screen, Screen) and screen._running and screen not in stacked:
                try:
                    await asyncio.wait_for(screen._mounted_event.wait(), 2.0)
                    if isinstance(screen, RunDetailScreen):
                        await screen._drain()
                except Exception:
                    pass
                await self._prune(screen)
        await super()._close_all()

    def on_unmount(self) -> None:
        if self._frozen:
            self._frozen = False
            gc.unfreeze()

    # ------------------------------------------------------------------ shared state
    def load_draft(self, ref: str) -> Draft:
        """The preset the mixture builder, stage-plan editor and launch screen work on."""
        self.draft = Draft.load(paths.find_preset(ref))
        return self.draft

    # ------------------------------------------------------------------ navigation / actions
    def open_run(self, run_id: str) -> None:
        """Show a run's detail. One detail screen is built and reused: opening a run swaps its data."""
        self.switch_mode("runs")
        while len(self.screen_stack) > 1:
            self.pop_screen()
        if not self.is_screen_installed("detail"):
            self.install_screen(RunDetailScreen(run_id), "detail")
        detail = self.get_screen("detail")
        detail.set_run(run_id)
        # Read the run first and push the screen with its data: one layout and paint of the curves,
        # not an empty frame then a second one (and no GIL contention between the two). A slow read
        # does not hold the screen back for more than OPEN_WAIT_S (it then fills in when done).
        self._opening = run_id
        base = self.screen

        def push() -> None:
            if self._opening == run_id and self.screen is base:
                self._opening = None
                self.push_screen("detail")

        detail.poll(hidden=True, then=push)
        self.set_timer(self.OPEN_WAIT_S, push)

    def attach_logs(self, run_id: str) -> None:
        self.push_screen(LogScreen(run_id))

    def compare(self, run_ids: list[str]) -> None:
        self.switch_mode("runs")
        self.push_screen(CompareScreen(run_ids))

    def launch_preset(self, ref: str) -> None:
        self.switch_mode("launch")
        self.screen.set_preset(ref)

    @work(thread=True, group="action")
    def stop_run(self, run_id: str) -> None:
        from cpt_tui.ui.actions import stop_run
        self.call_from_thread(self.notify, f"stopping {run_id} (the trainer checkpoints first)…")
        try:
            what = stop_run(self.db_path, run_id)
            self.call_from_thread(self.notify, f"{run_id}: {what}")
        except Exception as e:
            self.call_from_thread(self.notify, f"stop {run_id}: {e}", severity="error")


def run_app(db_path: Path) -> int:
    CptApp(db_path).run()
    return 0


if __name__ == "__main__":  # the UI alone (no orphan adoption): python -m cpt_tui.ui.app [--db PATH]
    import argparse
    ap = argparse.ArgumentParser(prog="python -m cpt_tui.ui.app")
    ap.add_argument("--db")
    raise SystemExit(run_app(paths.db_path(ap.parse_args().db)))
