"""Launch: pick a preset and where it runs (this machine, or the preset's nodes), see the exact
commands (dry run), and start it as a detached supervised run (`lifecycle.start_detached`): the UI
can be closed and reopened, the run goes on and is found again in the runs table."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Header, Input, Select, Static

from cpt_tui import paths
from cpt_tui.ui.widgets import KeysFooter, Note

TARGETS = [("this machine (local)", "local"), ("the preset's nodes (ssh)", "nodes"),
           ("the preset's Slurm cluster (sbatch)", "slurm")]


def launchable(preset_ref: str, target: str) -> Path:
    """The preset file to launch: the preset itself, or a copy with `cluster.kind: local` when a
    preset with nodes (or a Slurm cluster) is run here. Raises ValueError for nodes without any, or
    Slurm without `kind: slurm`."""
    path = paths.find_preset(preset_ref)
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    cluster = data.get("cluster") or {}
    if target == "slurm":
        if cluster.get("kind") != "slurm":
            raise ValueError(f"{path}: cluster is not a Slurm cluster (kind: {cluster.get('kind', 'local')}); "
                             "set cluster.kind: slurm and a `slurm:` block, or launch locally")
        return path
    if target == "nodes":
        if cluster.get("kind") != "ssh":
            raise ValueError(f"{path}: cluster has no nodes (kind: {cluster.get('kind', 'local')}); "
                             "add cluster.nodes or launch locally")
        return path
    if cluster.get("kind", "local") == "local":
        return path
    data["cluster"] = {k: v for k, v in cluster.items() if k in ("processes_per_node", "env", "main_process_port")}
    data["cluster"]["kind"] = "local"
    out = paths.home() / "presets" / f"{path.stem}.local.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return out


def dry_run(preset_path: Path) -> str:
    return dry_run_parts(preset_path)[0]


def dry_run_parts(preset_path: Path) -> tuple[str, str]:
    """(the plan and the commands, the memory / ETA summary per stage: engine.memory via the plan)."""
    from cpt_tui import backends
    from cpt_tui.presets import load_checked
    from engine.memory import format_memory
    from engine.plan import format_plan

    path, preset, plan = load_checked(str(preset_path), check_paths=False)
    out = [format_plan(plan)]
    for name, text in backends.dry_run(preset).items():
        out.append(f"\n# commands for stage {name}:\n{text}")
    mem = [f"[{st['index'] + 1}] {st['name']}: {format_memory(st.get('memory'))}" for st in plan["stages"]]
    return "\n".join(out), "\n".join(mem)


class LaunchScreen(Screen):
    BINDINGS = [Binding("ctrl+r", "dry_run", "Dry run", id="launch.dry_run"),
                Binding("ctrl+l", "launch", "Launch", id="launch.launch")]

    def __init__(self):
        super().__init__(id="launch-screen")
        self.launched: Optional[str] = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(classes="toolbar"):
            yield Input(placeholder="preset name or path", id="launch-preset")
            yield Select(TARGETS, value="local", allow_blank=False, id="launch-target")
            yield Button("Dry run", id="dry-run")
            yield Button("Launch", id="launch", variant="success")
        yield Note("", id="launch-status")
        yield Static("", id="launch-memory")  # per process: memory per stage, verdict, ETA (engine.memory)
        yield VerticalScroll(Static("", id="commands"), id="commands-scroll")
        yield KeysFooter()

    def on_mount(self) -> None:
        if self.app.draft is not None and self.app.draft.path:
            self.query_one("#launch-preset", Input).value = str(self.app.draft.path)

    def set_preset(self, ref: str) -> None:
        self.query_one("#launch-preset", Input).value = ref
        self.action_dry_run()

    def _choice(self) -> tuple[str, str]:
        return self.query_one("#launch-preset", Input).value.strip(), self.query_one("#launch-target", Select).value

    @on(Button.Pressed, "#dry-run")
    @on(Input.Submitted, "#launch-preset")
    def action_dry_run(self) -> None:
        self._dry(*self._choice())

    @work(thread=True, exclusive=True, group="launch")
    def _dry(self, ref: str, target: str) -> None:
        try:
            text, memory = dry_run_parts(launchable(ref, target))
            self.app.call_from_thread(self._show, text, "dry run: nothing was started", False, memory)
        except Exception as e:
            self.app.call_from_thread(self._show, None, str(e), True)

    def _show(self, text: Optional[str], status: str, error: bool, memory: Optional[str] = None) -> None:
        if memory is not None:
            self.query_one("#launch-memory", Static).update(Text(memory))
        if text is not None:
            self.query_one("#commands", Static).update(Text(text))
        self.query_one("#launch-status", Note).set(status, error)

    @on(Button.Pressed, "#launch")
    def action_launch(self) -> None:
        self.query_one("#launch-status", Note).set("starting (validating, checking nodes)…")
        self._launch(*self._choice())

    @work(thread=True, exclusive=True, group="launch")
    def _launch(self, ref: str, target: str) -> None:
        from cpt_tui.lifecycle import start_detached
        try:
            run_id = start_detached(launchable(ref, target), self.app.db_path)
        except Exception as e:
            self.app.call_from_thread(self._show, None, f"not launched: {e}", True)
            return
        self.launched = run_id
        self.app.call_from_thread(self._show, None, f"launched run {run_id} (detached; safe to quit the UI)", False)
        self.app.call_from_thread(self.app.open_run, run_id)
