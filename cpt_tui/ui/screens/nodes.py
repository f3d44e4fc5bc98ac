"""Nodes: the nodes configured in presets (and this machine), whether their ssh port answers, and
their latest telemetry with sparklines. Without a telemetry table (or samples) it says so."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import yaml
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Header, Label, Static

from cpt_tui import paths
from cpt_tui.store import Store
from cpt_tui.fmt import fmt_si
from cpt_tui.ui.data import NodeTelemetry, node_telemetry
from cpt_tui.ui.plot import sparkline
from cpt_tui.ui.widgets import KeysFooter, PollingScreen

REACH_TIMEOUT_S = 1.5


@dataclass
class NodeRow:
    name: str
    host: str
    port: int
    presets: list[str]


def configured_nodes(extra_presets=()) -> list[NodeRow]:
    nodes: dict[tuple, NodeRow] = {("local", 0): NodeRow("local", socket.gethostname(), 0, [])}
    for p in [*paths.list_presets(), *extra_presets]:
        try:
            data = yaml.safe_load(open(p, encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue
        cluster = data.get("cluster") or {}
        if cluster.get("kind") != "ssh":
            nodes[("local", 0)].presets.append(data.get("name", p.stem))
            continue
        for n in cluster.get("nodes") or []:
            key = (n.get("host"), n.get("port") or 22)
            row = nodes.setdefault(key, NodeRow(n.get("host", "?"), n.get("host", "?"), n.get("port") or 22, []))
            row.presets.append(data.get("name", p.stem))
    return list(nodes.values())


def reachable(host: str, port: int) -> str:
    if port == 0:
        return "yes (this machine)"
    try:
        with socket.create_connection((host, port), timeout=REACH_TIMEOUT_S):
            return "ssh port open"
    except socket.gaierror:
        return "unknown host (maybe an ~/.ssh/config alias)"
    except OSError as e:
        return f"no ({e.strerror or e})"


class NodesScreen(PollingScreen):
    POLL_S = 5.0
    BINDINGS = [Binding("r", "refresh", "Refresh", id="nodes.refresh")]

    def __init__(self):
        super().__init__(id="nodes-screen")

    def compose(self) -> ComposeResult:
        yield Header()
        t = DataTable(id="nodes", zebra_stripes=True, cursor_type="row")
        t.add_columns("node", "port", "reachable", "presets", "cpu %", "ram", "gpu util", "gpu mem", "temp °C",
                      "power W")
        yield t
        yield Static("", id="telemetry-note")
        yield VerticalScroll(id="node-sparks")
        yield KeysFooter()

    def action_refresh(self) -> None:
        self.poll()

    def fetch(self, store: Store):
        extra = [self.app.draft.path] if self.app.draft is not None and self.app.draft.path else []
        nodes = configured_nodes(extra)
        reach = {n.name: reachable(n.host, n.port) for n in nodes}
        tele = node_telemetry(store, None) if store is not None else []
        has_table = store is not None and store.has_table("telemetry")
        return nodes, reach, tele, has_table

    def show(self, data) -> None:
        if data is None:
            data = (configured_nodes(), {}, [], False)
        nodes, reach, tele, has_table = data
        by_node = {t.node: t for t in tele}
        t = self.query_one("#nodes", DataTable)
        t.clear()
        names = [n.name for n in nodes] + [n for n in by_node if n not in {x.name for x in nodes}]
        for name in names:
            n = next((x for x in nodes if x.name == name), None)
            tm = by_node.get(name) or by_node.get("local" if name == "local" else "") or NodeTelemetry(name, {}, {})
            lt = tm.latest
            t.add_row(name, str(n.port or "-") if n else "-", reach.get(name, "?"),
                      ", ".join(sorted(set(n.presets)))[:40] if n else "(telemetry only)",
                      fmt_si(lt.get("cpu_percent")), fmt_si(lt.get("ram_used")), fmt_si(lt.get("gpu0.util_gpu")),
                      fmt_si(lt.get("gpu0.mem_used")), fmt_si(lt.get("gpu0.temperature")),
                      fmt_si(lt.get("gpu0.power_w")))
        note = "" if tele else ("no telemetry samples yet" if has_table else
                                "no telemetry table in this database (older schema): reachability only")
        self.query_one("#telemetry-note", Static).update(Text(note, style="dim"))
        box = self.query_one("#node-sparks", VerticalScroll)
        box.remove_children()
        rows = []
        for tm in tele:
            for metric, values in sorted(tm.series.items()):
                rows.append(Horizontal(Label(f"{tm.node} {metric}: {fmt_si(tm.latest.get(metric))}",
                                             classes="spark-label"), sparkline(values[-120:]), classes="spark-row"))
        box.mount_all(rows)
