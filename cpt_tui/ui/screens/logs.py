"""Attach logs: follows the run's process logs (supervisor, preparation, each stage's trainer)."""

from __future__ import annotations

from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Header, RichLog

from cpt_tui.store import Store
from cpt_tui.ui.widgets import KeysFooter
from engine.layout import RunLayout

FOLLOW_S = 1.0


class LogScreen(Screen):
    BINDINGS = [Binding("escape", "app.pop_screen", "Back", id="logs.back")]

    def __init__(self, run_id: str):
        super().__init__()
        self.run_id = run_id
        self.pos: dict[Path, int] = {}
        self._busy = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield RichLog(id="logview", wrap=False, max_lines=5000)
        yield KeysFooter()

    def on_mount(self) -> None:
        self.follow()
        self.set_interval(FOLLOW_S, self.follow)

    def follow(self) -> None:
        if not self._busy:
            self._busy = True
            self._read()

    @work(thread=True, group="logs")
    def _read(self) -> None:
        try:
            with Store(self.app.db_path, readonly=True) as store:
                run = store.run(self.run_id)
                stages = store.stages(self.run_id) if run else []
            if run is None:
                return
            d = Path(run["run_dir"])
            files = RunLayout(d).logs([s["name"] for s in stages])
            chunks = []
            for f in files:
                if not f.exists():
                    continue
                with open(f, "rb") as fh:
                    fh.seek(self.pos.get(f, 0))
                    data = fh.read(1 << 20)
                if data:
                    self.pos[f] = self.pos.get(f, 0) + len(data)
                    lines = [l for l in data.decode(errors="replace").splitlines() if "it/s]" not in l]
                    chunks.append((str(f.relative_to(d)), lines))
            if chunks:
                self.app.call_from_thread(self._write, chunks)
        finally:
            self._busy = False

    def _write(self, chunks) -> None:
        log = self.query_one("#logview", RichLog)
        for name, lines in chunks:
            log.write(f"==> {name} <==")
            for line in lines[-2000:]:
                log.write(line)
