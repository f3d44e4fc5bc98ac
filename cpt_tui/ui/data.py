"""What the screens show, computed from SQLite and presets. Pure Python, no Textual: every function
here runs in a worker thread and returns plain data the screens render on the event loop.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cpt_tui.fmt import fmt_duration, fmt_num, fmt_si, fmt_time, progress_bar
from cpt_tui.store import Store
from engine.layout import RunLayout

RUN_COLUMNS = ("run", "status", "preset", "stage", "progress", "tokens", "loss", "tok/s", "ETA", "nodes", "started")


# --------------------------------------------------------------------------- runs


@dataclass
class RunRow:
    id: str
    cells: tuple  # display strings, in RUN_COLUMNS order
    sort: tuple  # sort keys, same order
    status: str
    run_dir: str


def _nodes_of(run: dict, cache: dict) -> str:
    """The run's nodes from its preset copy (read once per run), else its host."""
    if run["id"] in cache:
        return cache[run["id"]]
    label = run.get("host") or "local"
    try:
        import yaml
        data = yaml.safe_load(RunLayout(run["run_dir"]).preset.read_text())
        cluster = (data or {}).get("cluster") or {}
        if cluster.get("kind") == "slurm":
            label = f"slurm ×{((cluster.get('slurm') or {}).get('nodes') or 1)}"
        elif cluster.get("kind") == "ssh":
            hosts = [n.get("host", "?") for n in cluster.get("nodes", [])]
            label = f"{len(hosts)}: " + ",".join(hosts) if len(hosts) > 1 else (hosts[0] if hosts else "?")
        else:
            label = f"local ({run.get('host') or '?'})"
    except (OSError, ValueError, AttributeError):
        pass
    cache[run["id"]] = label
    return label


def scheduler_label(stages: list) -> str:
    """The scheduler's view of the latest stage job: `job 12 PENDING (Resources)`, `job 12 RUNNING`."""
    for s in reversed(stages):
        text = s.get("scheduler")
        if text:
            try:
                d = json.loads(text)
            except ValueError:
                return ""
            reason = d.get("reason")
            why = f" ({reason})" if reason and reason != "None" and d.get("state") == "PENDING" else ""
            return f"job {d.get('job')} {d.get('state')}{why}"
    return ""


def run_rows(store: Store, nodes_cache: Optional[dict] = None) -> list[RunRow]:
    nodes_cache = {} if nodes_cache is None else nodes_cache
    rows = []
    for r in store.runs():
        stages = store.stages(r["id"])
        cur = r["current_stage"] or 0
        n = r["n_stages"] or len(stages)
        steps_total = sum(s["steps_total"] or 0 for s in stages)
        steps_done = sum((s["steps_total"] or 0) if s["status"] == "done" else (s["step"] or 0) for s in stages)
        frac = steps_done / steps_total if steps_total else (1.0 if r["status"] == "done" else 0.0)
        tokens = sum(s["tokens"] or 0 for s in stages)
        tokens_total = sum(s["tokens_total"] or 0 for s in stages)
        tps = r.get("last_tps")
        eta = None
        if r["status"] == "running" and tps and tokens_total:
            eta = max(tokens_total - tokens, 0) / tps
        elif r["status"] == "done":
            eta = 0.0
        started = r["started"] or r["created"]
        nodes = _nodes_of(r, nodes_cache)
        sched = scheduler_label(stages)
        cells = (r["id"], r["status"], r["preset"], f"{cur + 1}/{n}", progress_bar(frac), fmt_si(tokens),
                 fmt_num(r.get("last_loss")), fmt_si(tps), fmt_duration(eta), f"{nodes}: {sched}" if sched else nodes,
                 fmt_time(started))
        sort = (r["id"], r["status"], r["preset"], cur, frac, tokens, r.get("last_loss") or 0.0, tps or 0.0,
                eta if eta is not None else math.inf, cells[9], started or 0)
        rows.append(RunRow(r["id"], cells, sort, r["status"], r["run_dir"]))
    return rows


# --------------------------------------------------------------------------- curves


@dataclass
class StageSpan:
    name: str
    status: str
    step_offset: float
    token_offset: float
    steps: float  # extent on the global step axis
    tokens: float


@dataclass
class Curves:
    """Everything the run-detail charts need, on both x axes (global step and tokens seen)."""

    stages: list[StageSpan] = field(default_factory=list)
    step: list[float] = field(default_factory=list)
    tokens: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    tps: list[float] = field(default_factory=list)
    points: int = 0  # raw rows the buckets stand for (upper bound)
    evals: dict[str, tuple[list[float], list[float], list[float]]] = field(default_factory=dict)  # domain → step, tokens, loss

    def x(self, axis: str) -> list[float]:
        return self.tokens if axis == "tokens" else self.step

    def boundaries(self, axis: str) -> list[float]:
        """Where each stage after the first starts, on `axis`."""
        return [(s.token_offset if axis == "tokens" else s.step_offset) for s in self.stages[1:]]


def ema(values: list[float], alpha: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def _lineage_sources(store: Store, run_id: str, stages: list) -> list[str]:
    """The run each stage's curve comes from: its own, or — for a stage `--from-stage` skipped — the
    earlier run whose finished stages it started from (`--init-from RUN`), so the curves show the
    whole lineage on one axis."""
    try:
        lin = json.loads(store.run(run_id)["options"] or "{}").get("lineage") or {}
    except (TypeError, ValueError):
        lin = {}
    init = lin.get("init_from") or {}
    earlier = set(init.get("stages") or []) if init.get("run") else set()
    return [init["run"] if s["status"] == "skipped" and s["name"] in earlier else run_id for s in stages]


def load_curves(store: Store, run_id: str, buckets: int = 400) -> Curves:
    """Metrics downsampled in SQL to about `buckets` points over the whole run (split between stages by
    their step extent), stages laid end to end on a global step / tokens axis; stages skipped by
    `--from-stage` show the earlier run's curves (their span is named `NAME (RUN)`)."""
    c = Curves()
    stages = store.stages(run_id)
    sources = _lineage_sources(store, run_id, stages)
    extents = [store.metric_extent(src, s["name"]) for src, s in zip(sources, stages)]
    spans = []
    for s, e in zip(stages, extents):
        planned = s["steps_total"] or 0
        steps = max(planned, e["last_step"] if e else 0)
        tokens = max(s["tokens_total"] or 0, e["last_tokens"] or 0 if e else 0)
        spans.append((steps, tokens))
    total_steps = sum(st for st, _ in spans) or 1
    step_off = tok_off = 0.0
    for s, src, e, (steps, tokens) in zip(stages, sources, extents, spans):
        name = s["name"] if src == run_id else f"{s['name']} ({src})"
        c.stages.append(StageSpan(name, s["status"], step_off, tok_off, steps, tokens))
        if e:
            lo, hi = e["first_step"], e["last_step"]
            nb = max(8, int(buckets * steps / total_steps))
            for _, step, tok, loss, lr, tps, n in store.metric_buckets(src, s["name"], lo, hi, nb):
                c.step.append(step_off + step)
                c.tokens.append(tok_off + (tok or 0))
                c.loss.append(loss)
                c.lr.append(lr)
                c.tps.append(tps)
            c.points += hi - lo + 1
            for domain, step, tok, loss in store.eval_buckets(src, s["name"], lo, hi, nb):
                xs = c.evals.setdefault(domain or "?", ([], [], []))
                xs[0].append(step_off + step)
                xs[1].append(tok_off + (tok or 0))
                xs[2].append(loss)
        step_off += steps
        tok_off += tokens
    return c


# --------------------------------------------------------------------------- detail side panels


def recent_events(store: Store, run_id: str, limit: int = 200) -> list[tuple[str, str, str, str]]:
    """(time, stream, type, summary) of the latest events, skipping per-step metrics."""
    out = []
    for e in store.events(run_id, limit, skip_types=("metric",)):
        summary = " ".join(f"{k}={v}" for k, v in e.data.items() if k != "commands" and not isinstance(v, (dict, list)))
        out.append((time.strftime("%H:%M:%S", time.localtime(e.ts)), e.stage, e.type, summary[:160]))
    return out


def log_tail(run: dict, stages: list[dict], max_bytes: int = 16384, lines: int = 60) -> tuple[str, str]:
    """(file name, last lines) of the current stage's trainer log (or the preparation/supervisor log)."""
    layout = RunLayout(run["run_dir"])
    run_dir = layout.root
    cur = run.get("current_stage")
    cands = []
    if cur is not None and cur < len(stages):
        cands.append(layout.stage(stages[cur]["name"]).log)
    cands += [layout.prepare_log, layout.supervisor_log]
    for p in cands:
        if p.exists():
            with open(p, "rb") as f:
                f.seek(max(0, p.stat().st_size - max_bytes))
                text = f.read().decode(errors="replace")
            text = "\n".join(l for l in text.splitlines()[-lines:] if "it/s]" not in l)
            return str(p.relative_to(run_dir)), text
    return "", "(no log yet)"


@dataclass
class NodeTelemetry:
    node: str
    latest: dict  # metric → latest value (host and GPU 0, GPU metrics prefixed gpuN.)
    series: dict[str, list[float]]  # metric → recent values


TELEMETRY_FIELDS = {"host": ("cpu_percent", "ram_used"),
                    "gpu": ("util_gpu", "mem_used", "temperature", "power_w")}


def node_telemetry(store: Store, run_id: Optional[str], seconds: float = 600.0) -> list[NodeTelemetry]:
    samples = store.telemetry_recent(run_id, seconds)
    nodes: dict[str, NodeTelemetry] = {}
    for s in samples:
        nt = nodes.setdefault(s["node"], NodeTelemetry(s["node"], {}, {}))
        prefix = "" if s["kind"] == "host" else f"gpu{max(s['idx'], 0)}."
        for k in TELEMETRY_FIELDS.get(s["kind"], ()):
            v = s["metrics"].get(k)
            if isinstance(v, (int, float)):
                nt.series.setdefault(prefix + k, []).append(float(v))
                nt.latest[prefix + k] = v
    return list(nodes.values())


# --------------------------------------------------------------------------- presets


def measured_tps(store: Optional[Store], preset: str) -> Optional[float]:
    """Throughput of the latest run of this preset that logged any (for pre-launch ETAs)."""
    return None if store is None else store.latest_tokens_per_s(preset)


def prepared_tokens(store: Optional[Store], preset: str) -> dict[str, int]:
    """Training tokens per source from the newest prepared run of this preset (its prepared.json)."""
    if store is None:
        return {}
    for run_dir in store.run_dirs(preset):
        try:
            prepared = json.loads(RunLayout(run_dir).prepared.read_text())
            return {n: s["train_tokens"] for n, s in prepared.get("sources", {}).items() if "train_tokens" in s}
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return {}


BYTES_PER_TOKEN = 4.0  # quick estimate when nothing was prepared yet


def estimate_tokens(src) -> Optional[int]:
    """A quick estimate of a source's training tokens from file sizes (capped by max_tokens)."""
    from engine.data.sources import DataError, source_files
    try:
        if src.path.startswith("builtin:"):
            import sysconfig
            root = Path(sysconfig.get_paths()["stdlib"])
            size = sum(p.stat().st_size for p in root.glob("*.py"))
            size *= 0.12 if src.path.endswith("prose") else 1.0
        else:
            size = sum(Path(f).stat().st_size for f in source_files(src))
    except (DataError, OSError):
        return None
    tokens = int(size / BYTES_PER_TOKEN) - (src.val_tokens or 0)
    if src.max_tokens:
        tokens = min(tokens, src.max_tokens)
    return max(tokens, 0)
