"""Command-palette provider: open a run, launch a preset, stop a run, compare runs, go to a screen."""

from __future__ import annotations

import asyncio
from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

from cpt_tui import paths
from cpt_tui.store import TERMINAL, Store

MAX_RUNS = 50


def _runs(db) -> list[dict]:
    if not db.exists():
        return []
    store = Store(db, readonly=True)
    try:
        return [{"id": r["id"], "status": r["status"], "preset": r["preset"]} for r in store.runs()[:MAX_RUNS]]
    finally:
        store.close()


class CptCommands(Provider):
    async def startup(self) -> None:
        app = self.app
        self.runs = await asyncio.to_thread(_runs, app.db_path)
        self.presets = [p.stem for p in paths.list_presets()]

    def _commands(self) -> list[tuple[str, object, str]]:
        app = self.app
        out = [(f"Go to {label}", partial(app.switch_mode, mode), f"the {label} screen")
               for mode, label in app.MODE_LABELS.items()]
        for r in self.runs:
            out.append((f"Open run {r['id']}", partial(app.open_run, r["id"]), f"{r['preset']}, {r['status']}"))
            if r["status"] not in TERMINAL:
                out.append((f"Stop run {r['id']}", partial(app.stop_run, r["id"]), "graceful: checkpoint, then exit"))
        for a, b in zip(self.runs, self.runs[1:]):
            out.append((f"Compare {a['id']} with {b['id']}", partial(app.compare, [a["id"], b["id"]]),
                        "loss and validation curves"))
        for p in self.presets:
            out.append((f"Launch preset {p}", partial(app.launch_preset, p), "dry run first, then Launch"))
        return out

    async def discover(self) -> Hits:
        for text, cb, help in self._commands()[:20]:
            yield DiscoveryHit(text, cb, help=help)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for text, cb, help in self._commands():
            score = matcher.match(text)
            if score > 0:
                yield Hit(score, matcher.highlight(text), cb, text=text, help=help)
