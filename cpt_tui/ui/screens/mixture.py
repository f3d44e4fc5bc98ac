"""Mixture builder: sources with their token counts (from a prepared run of the preset, else a quick
estimate from file sizes), editable weights and budget, and a live table of tokens, share and epochs
per source with repetition warnings. Saves back to a preset file."""

from __future__ import annotations

from typing import Optional

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, DataTable, Header, Input, Label, Select

from engine.data.mixture import plan_mixture
from engine.spec import MixtureSpec
from cpt_tui.fmt import fmt_si
from cpt_tui.ui.data import estimate_tokens, prepared_tokens
from cpt_tui.ui.draft import Draft, parse_value
from cpt_tui.ui.widgets import KeysFooter, Note

BUDGET_KINDS = [("tokens", "tokens"), ("epochs", "epochs")]


class MixtureScreen(Screen):
    BINDINGS = [Binding("ctrl+s", "save", "Save preset", id="mixture.save"),
                Binding("ctrl+o", "load", "Load preset", id="mixture.load")]

    def __init__(self):
        super().__init__(id="mixture-screen")
        self.target: Optional[str] = None
        self.tokens: dict[str, int] = {}
        self.estimated: set[str] = set()
        self._loaded_draft = None
        self._gen = 0  # weight inputs are re-created per mixture; ids carry a generation

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(classes="toolbar"):
            yield Input(placeholder="preset name or path", id="mix-preset")
            yield Button("Load", id="mix-load")
            yield Select([], prompt="mixture", id="mix-target", allow_blank=True)
        with Horizontal(classes="toolbar"):
            yield Label("budget", classes="field-label")
            yield Select(BUDGET_KINDS, value="tokens", allow_blank=False, id="budget-kind")
            yield Input(id="budget", placeholder="total training tokens")
        yield VerticalScroll(id="weights")
        yield DataTable(id="mix-table", zebra_stripes=True)
        yield Note("", id="mix-warnings")
        with Horizontal(classes="toolbar"):
            yield Input(placeholder="save to (preset file)", id="mix-save-path")
            yield Button("Save", id="mix-save", variant="primary")
        yield KeysFooter()

    def on_mount(self) -> None:
        t = self.query_one("#mix-table", DataTable)
        t.add_columns("source", "weight", "share", "tokens", "available", "epochs", "warning")
        if self.app.draft is not None:
            self.query_one("#mix-preset", Input).value = str(self.app.draft.path or "")
            self.load_draft()

    def on_screen_resume(self) -> None:
        if self.app.draft is not None and self.app.draft is not self._loaded_draft:
            self.load_draft()

    # ------------------------------------------------------------------ loading
    def action_load(self) -> None:
        name = self.query_one("#mix-preset", Input).value.strip()
        try:
            self.app.load_draft(name)
        except Exception as e:
            self.query_one("#mix-warnings", Note).set(str(e), error=True)
            return
        self.load_draft()

    @on(Button.Pressed, "#mix-load")
    @on(Input.Submitted, "#mix-preset")
    def _load_pressed(self) -> None:
        self.action_load()

    def load_draft(self) -> None:
        draft: Draft = self.app.draft
        self._loaded_draft = draft
        self.query_one("#mix-save-path", Input).value = str(draft.path or "")
        targets = draft.mixture_targets()
        sel = self.query_one("#mix-target", Select)
        sel.set_options(targets)
        self.target = targets[0][1] if targets else None
        if self.target:
            sel.value = self.target
        self._count_tokens(draft)
        self.build_weights()

    @work(thread=True, exclusive=True, group="tokens")
    def _count_tokens(self, draft: Draft) -> None:
        """Real counts from the newest prepared run of this preset; otherwise a file-size estimate."""
        from cpt_tui.store import Store
        from engine.spec import SourceSpec

        store = Store(self.app.db_path, readonly=True) if self.app.db_path.exists() else None
        try:
            counts = prepared_tokens(store, draft.data.get("name", ""))
        finally:
            if store:
                store.close()
        estimated = set()
        for name, src in (draft.data.get("sources") or {}).items():
            if name not in counts:
                try:
                    est = estimate_tokens(SourceSpec.model_validate(src))
                except Exception:
                    est = None
                if est is not None:
                    counts[name] = est
                    estimated.add(name)
        self.app.call_from_thread(self._set_tokens, counts, estimated)

    def _set_tokens(self, counts: dict, estimated: set) -> None:
        self.tokens, self.estimated = counts, estimated
        self.recompute()

    @on(Select.Changed, "#mix-target")
    def _target_changed(self, event: Select.Changed) -> None:
        if event.value is not Select.BLANK and event.value != self.target:
            self.target = event.value
            self.build_weights()

    def build_weights(self) -> None:
        box = self.query_one("#weights", VerticalScroll)
        box.remove_children()
        if not self.target:
            return
        draft: Draft = self.app.draft
        mix = draft.mixture(self.target)
        weights = mix.get("weights") or {}
        rows = []
        self._gen += 1
        for i, name in enumerate(draft.data.get("sources") or {}):
            w = weights.get(name)
            rows.append(Horizontal(Label(name, classes="src-name"),
                                   Input(value="" if w is None else f"{w:g}", placeholder="0",
                                         id=f"w-{self._gen}-{i}", classes="weight"), classes="weight-row"))
        box.mount_all(rows)
        kind = "epochs" if mix.get("epochs") is not None else "tokens"
        self.query_one("#budget-kind", Select).value = kind
        self.query_one("#budget", Input).value = str(mix.get(kind) or "")
        self.recompute()

    # ------------------------------------------------------------------ editing
    def source_names(self) -> list[str]:
        return list(self.app.draft.data.get("sources") or {})

    @on(Input.Changed, ".weight")
    def _weight_changed(self, event: Input.Changed) -> None:
        name = self.source_names()[int(event.input.id.split("-")[2])]
        mix = self.app.draft.mixture(self.target)
        v = parse_value(event.value)
        weights = mix.setdefault("weights", {})
        if v == weights.get(name):  # e.g. the Input's first value "1" for 1.0: keep the file's spelling
            return
        if v is None:
            weights.pop(name, None)
        else:
            weights[name] = v
        self.recompute()

    @on(Input.Changed, "#budget")
    @on(Select.Changed, "#budget-kind")
    def _budget_changed(self) -> None:
        if not self.target:
            return
        mix = self.app.draft.mixture(self.target)
        kind = self.query_one("#budget-kind", Select).value
        v = parse_value(self.query_one("#budget", Input).value)
        other = "epochs" if kind == "tokens" else "tokens"
        if v is not None and mix.get(kind) == v and other not in mix:  # unchanged: leave the file as it is
            self.recompute()
            return
        mix.pop("tokens", None)
        mix.pop("epochs", None)
        if v is not None:
            mix[kind] = v
        self.recompute()

    def recompute(self) -> None:
        """The live table: the engine's own planner on the edited mixture."""
        table = self.query_one("#mix-table", DataTable)
        table.clear()
        note = self.query_one("#mix-warnings", Note)
        if not self.target:
            return
        draft: Draft = self.app.draft
        try:
            spec = MixtureSpec.model_validate(draft.mixture(self.target))
        except Exception as e:
            msgs = getattr(e, "errors", lambda: [{"msg": str(e), "loc": ()}])()
            note.set("; ".join(f"{'.'.join(map(str, m['loc'])) or 'mixture'}: "
                               f"{m['msg'].removeprefix('Value error, ')}" for m in msgs), error=True)
            return
        seq = draft.seq_len_of(self.target)
        known = {n: t for n, t in self.tokens.items() if n in spec.weights}
        plan = plan_mixture(spec, known, seq)
        for s in plan.sources:
            avail = self.tokens.get(s.name)
            avail_s = ("~" if s.name in self.estimated else "") + fmt_si(avail) if avail is not None else "?"
            ep = "-" if s.name not in known else ("∞" if s.epochs == float("inf") else f"{s.epochs:.2f}")
            warn = Text("; ".join(w.split(": ", 1)[-1] for w in s.warnings), style="yellow")
            table.add_row(s.name, f"{s.weight:g}", f"{s.share:.1%}", fmt_si(s.tokens), avail_s, ep, warn, key=s.name)
        _, problems = draft.validate()
        lines = [f"total {fmt_si(plan.tokens)} tokens = {plan.total_blocks:,} blocks × seq_len {seq}"]
        lines += [f"warning: {w}" for w in plan.warnings]
        lines += [f"{p}: {m}" for p, m in problems]
        note.set("\n".join(lines), error=bool(problems))

    def row(self, source: str) -> list:
        """The table row of a source (tests)."""
        return [str(c) for c in self.query_one("#mix-table", DataTable).get_row(source)]

    # ------------------------------------------------------------------ saving
    @on(Button.Pressed, "#mix-save")
    def action_save(self) -> None:
        path = self.query_one("#mix-save-path", Input).value.strip() or None
        _, problems = self.app.draft.validate()
        if problems:
            self.notify("not saved: " + "; ".join(f"{p}: {m}" for p, m in problems[:3]), severity="error")
            return
        try:
            p = self.app.draft.save(path)
        except (OSError, ValueError) as e:
            self.notify(f"not saved: {e}", severity="error")
            return
        self.notify(f"saved {p}")
