"""Stage-plan editor: add stages from templates (EEVE 3/4/6/7, CPT, annealing, context extension,
LoRA, ReLoRA), remove and reorder them, edit their fields with the preset schema's messages shown as
you type, and a pre-launch summary (steps, tokens, global batch, ETA from measured throughput)."""

from __future__ import annotations

from typing import Optional

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, DataTable, Header, Input, Label, Select, Static

from engine.plan import PlanError, resolve
from cpt_tui.fmt import fmt_duration, fmt_si
from cpt_tui.ui.data import measured_tps, prepared_tokens
from cpt_tui.ui.draft import TEMPLATES, Draft, get_path, parse_value, set_path
from cpt_tui.ui.widgets import KeysFooter, Note

# (YAML path inside a stage, label)
FIELDS = [
    ("name", "name"), ("kind", "kind"), ("start", "start"), ("from", "from"), ("mixture", "mixture"),
    ("seq_len", "seq_len"), ("micro_batch_size", "micro batch"), ("global_batch_size", "global batch"),
    ("precision", "precision"), ("zero_stage", "ZeRO stage"), ("schedule.name", "schedule"),
    ("schedule.lr", "lr"), ("schedule.min_lr", "min lr"), ("schedule.warmup_steps", "warmup steps"),
    ("trainable.input_embeddings", "input emb."), ("trainable.output_embeddings", "output emb."),
    ("trainable.transformer", "transformer"), ("lora.r", "LoRA r"), ("lora.alpha", "LoRA alpha"),
    ("lora.relora.merge_every", "ReLoRA merge"), ("rope_theta", "rope_theta"), ("max_steps", "max steps"),
]


def _fid(path: str) -> str:
    return "f-" + path.replace(".", "__")


class PlanScreen(Screen):
    BINDINGS = [
        Binding("ctrl+a", "add", "Add stage", id="plan.add"),
        Binding("ctrl+d", "remove", "Remove stage", id="plan.remove"),
        Binding("ctrl+up", "move(-1)", "Move up", id="plan.up"),
        Binding("ctrl+down", "move(1)", "Move down", id="plan.down"),
        Binding("ctrl+s", "save", "Save preset", id="plan.save"),
    ]

    def __init__(self):
        super().__init__(id="plan-screen")
        self.selected = 0
        self._loaded_draft = None
        self._filling = False
        self.tps: Optional[float] = None
        self.train_tokens: dict = {}

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(classes="toolbar"):
            yield Input(placeholder="preset name or path", id="plan-preset")
            yield Button("Load", id="plan-load")
            yield Select([(t, t) for t in TEMPLATES], value="CPT", allow_blank=False, id="template")
            yield Button("Add", id="plan-add", variant="success")
            yield Button("Remove", id="plan-remove", variant="error")
        with Horizontal(id="plan-body"):
            yield DataTable(id="stages", cursor_type="row", zebra_stripes=True)
            with VerticalScroll(id="stage-form"):
                for path, label in FIELDS:
                    with Horizontal(classes="form-row"):
                        yield Label(label, classes="field-label")
                        yield Input(id=_fid(path), classes="field")
                    yield Static("", id="err-" + _fid(path), classes="field-error")
        yield Note("", id="plan-problems")
        yield Static("", id="plan-summary")
        with Horizontal(classes="toolbar"):
            yield Input(placeholder="save to (preset file)", id="plan-save-path")
            yield Button("Save", id="plan-save", variant="primary")
        yield KeysFooter()

    def on_mount(self) -> None:
        t = self.query_one("#stages", DataTable)
        t.add_columns("#", "stage", "kind", "seq", "batch", "lr")
        if self.app.draft is not None:
            self.query_one("#plan-preset", Input).value = str(self.app.draft.path or "")
            self.load_draft()

    def on_screen_resume(self) -> None:
        if self.app.draft is not None and self.app.draft is not self._loaded_draft:
            self.load_draft()
        elif self.app.draft is not None:
            self.refresh_all()

    @property
    def draft(self) -> Draft:
        return self.app.draft

    # ------------------------------------------------------------------ loading
    @on(Button.Pressed, "#plan-load")
    @on(Input.Submitted, "#plan-preset")
    def _load(self) -> None:
        try:
            self.app.load_draft(self.query_one("#plan-preset", Input).value.strip())
        except Exception as e:
            self.query_one("#plan-problems", Note).set(str(e), error=True)
            return
        self.load_draft()

    def load_draft(self) -> None:
        self._loaded_draft = self.draft
        self.selected = 0
        self.query_one("#plan-save-path", Input).value = str(self.draft.path or "")
        self._measure(self.draft.data.get("name", ""))
        self.refresh_all()

    @work(thread=True, exclusive=True, group="measure")
    def _measure(self, preset: str) -> None:
        from cpt_tui.store import Store
        if not self.app.db_path.exists():
            return
        store = Store(self.app.db_path, readonly=True)
        try:
            tps, tokens = measured_tps(store, preset), prepared_tokens(store, preset)
        finally:
            store.close()
        self.app.call_from_thread(self._measured, tps, tokens)

    def _measured(self, tps, tokens) -> None:
        self.tps, self.train_tokens = tps, tokens
        self.refresh_summary()

    # ------------------------------------------------------------------ rendering
    def refresh_all(self) -> None:
        self.refresh_table()
        self.fill_form()
        self.refresh_summary()

    def refresh_table(self) -> None:
        t = self.query_one("#stages", DataTable)
        t.clear()
        for i, st in enumerate(self.draft.stages):
            t.add_row(str(i + 1), str(st.get("name", "?")), str(st.get("kind", "cpt")), str(st.get("seq_len", "?")),
                      str(st.get("global_batch_size", "?")), str(get_path(st, "schedule.lr") or "-"))
        if self.draft.stages:
            self.selected = min(self.selected, len(self.draft.stages) - 1)
            t.move_cursor(row=self.selected)

    def fill_form(self) -> None:
        st = self.draft.stages[self.selected] if self.draft.stages else {}
        self._filling = True
        try:
            for path, _ in FIELDS:
                v = get_path(st, path)
                if isinstance(v, dict):
                    v = "(inline mixture)"
                self.query_one("#" + _fid(path), Input).value = "" if v is None else str(v)
        finally:
            self._filling = False
        self.show_errors()

    def show_errors(self) -> list[tuple[str, str]]:
        _, problems = self.draft.validate()
        prefix = f"stages[{self.selected}]."
        by_field = {}
        other = []
        for p, m in problems:
            if p.startswith(prefix) and p[len(prefix):] in dict(FIELDS):
                by_field[p[len(prefix):]] = m
            elif p.startswith(prefix):
                # a field with no input of its own, or a cross-field check: show it under the closest one
                head = p[len(prefix):].split(".")[0]
                if head in dict(FIELDS):
                    by_field[head] = m
                else:
                    other.append(f"{p}: {m}")
            else:
                other.append(f"{p or '(preset)'}: {m}")
        for path, _ in FIELDS:
            self.query_one("#err-" + _fid(path), Static).update(Text(by_field.get(path, ""), style="red"))
        self.query_one("#plan-problems", Note).set("\n".join(other), error=bool(other))
        return problems

    def refresh_summary(self) -> None:
        preset, problems = self.draft.validate()
        box = self.query_one("#plan-summary", Static)
        if preset is None or problems:
            box.update(Text("plan: fix the fields marked in red", style="yellow"))
            return
        try:
            plan = resolve(preset, self.train_tokens or None)
        except PlanError as e:
            box.update(Text(f"{e.yaml_path}: {e.msg}", style="red"))
            return
        tps = self.tps
        t = Text(f"pre-launch summary — {plan['world_size']} process(es), {plan['cluster']}; "
                 + (f"ETA from measured {fmt_si(tps)} tok/s\n" if tps else "no measured throughput yet\n"))
        total_s = 0.0
        for st in plan["stages"]:
            eta = st["tokens"] / tps if tps and st["tokens"] else None
            total_s += eta or 0
            t.append(f"  {st['index'] + 1}. {st['name']:<16} {st['kind']:<17} steps {st['steps'] or '?':>8}  "
                     f"tokens {fmt_si(st['tokens']):>7}  global batch {st['global_batch_size']} "
                     f"(= {st['micro_batch_size']} × {st['grad_accum']} × {plan['world_size']})  "
                     f"ETA {fmt_duration(eta)}\n")
        if tps:
            t.append(f"  total ETA {fmt_duration(total_s)}")
        box.update(t)

    # ------------------------------------------------------------------ editing
    @on(DataTable.RowHighlighted, "#stages")
    def _row(self, event: DataTable.RowHighlighted) -> None:
        if event.cursor_row != self.selected and 0 <= event.cursor_row < len(self.draft.stages):
            self.selected = event.cursor_row
            self.fill_form()

    @on(Input.Changed, ".field")
    def _field_changed(self, event: Input.Changed) -> None:
        if self._filling or not self.draft.stages:
            return
        path = event.input.id[2:].replace("__", ".")
        st = self.draft.stages[self.selected]
        if path == "mixture" and event.value == "(inline mixture)":
            return
        set_path(st, path, parse_value(event.value))
        self.show_errors()
        self.refresh_summary()
        row = self.query_one("#stages", DataTable)
        if row.row_count > self.selected:
            for col, key in ((1, "name"), (2, "kind"), (3, "seq_len"), (4, "global_batch_size")):
                row.update_cell_at((self.selected, col), str(st.get(key, "?")))

    def action_add(self) -> None:
        tpl = self.query_one("#template", Select).value
        self.selected = self.draft.add_stage(tpl, self.selected if self.draft.stages else None)
        self.refresh_all()

    @on(Button.Pressed, "#plan-add")
    def _add(self) -> None:
        self.action_add()

    def action_remove(self) -> None:
        if len(self.draft.stages) > 0:
            self.draft.remove_stage(self.selected)
            self.selected = max(0, self.selected - 1)
            self.refresh_all()

    @on(Button.Pressed, "#plan-remove")
    def _remove(self) -> None:
        self.action_remove()

    def action_move(self, delta: int) -> None:
        if self.draft.stages:
            self.selected = self.draft.move_stage(self.selected, delta)
            self.refresh_all()

    @on(Button.Pressed, "#plan-save")
    def action_save(self) -> None:
        path = self.query_one("#plan-save-path", Input).value.strip() or None
        problems = self.show_errors()
        if problems:
            self.notify("not saved: " + "; ".join(f"{p}: {m}" for p, m in problems[:3]), severity="error")
            return
        try:
            p = self.draft.save(path)
        except (OSError, ValueError) as e:
            self.notify(f"not saved: {e}", severity="error")
            return
        self.notify(f"saved {p}")
