"""Nodes without a shared disk (`cluster.shared_fs: false`): where a stage's files live on a node, and
rsync over the ssh backend's own ssh options to move them (push inputs, pull outputs).

On a node everything is relative to its workdir (the trainer runs there, so the stage JSON holds
workdir-relative paths and no `~` ever needs expanding):

    WORKDIR/cache/KEY/NAME        an input from outside the run directory (model, tokenizer, prepared
                                  source shards): KEY = sha256 of the manager path; prepared sources
                                  already live in content-keyed cache directories, so the same content
                                  keeps its node path and is never sent twice
    WORKDIR/runs/RUN/...          the run directory's own files (stage.json, checkpoints, events,
                                  final/), at the same relative path as on the manager

rsync runs with `--protect-args` (paths reach the node literally: spaces, `;`, `$(...)`), `--partial`
(a cut transfer resumes where it stopped), `--stats` (bytes really sent: `literal` below) and
`--info=progress2` (bytes/s, ETA). No local shell is involved anywhere.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Optional, Sequence

from cpt_tui.backends import LaunchError

CACHE_DIR = "cache"
RUNS_DIR = "runs"
RSYNC_FLAGS = ["-a", "--protect-args", "--partial", "--stats", "--info=progress2", "--no-inc-recursive"]
_PROGRESS = re.compile(r"^\s*([\d,]+)\s+(\d+)%\s+(\S+/s)\s+(\d+:\d\d:\d\d)")
_STAT = re.compile(r"^(Literal data|Total transferred file size|Total bytes sent|Total file size):\s*([\d,]+)", re.M)


def cache_key(path: str) -> str:
    return hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16]


def node_run_root(run_dir: str) -> str:
    """The run directory on a node, relative to its workdir."""
    return f"{RUNS_DIR}/{Path(run_dir).name}"


def node_path(path: str, run_dir: str) -> str:
    """A manager path as the trainer sees it on a node (relative to the node's workdir)."""
    p, root = os.path.abspath(path), os.path.abspath(run_dir)
    if p == root or p.startswith(root.rstrip("/") + "/"):
        rel = os.path.relpath(p, root)
        return node_run_root(run_dir) + ("" if rel == "." else "/" + rel)
    return f"{CACHE_DIR}/{cache_key(p)}/{Path(p).name}"


@dataclass
class Item:
    """One file or directory to push: `local` (manager) → `remote` (relative to the workdir)."""

    local: str
    remote: str


def stage_for_node(cfg: dict, run_dir: str) -> tuple[dict, list[Item]]:
    """The stage JSON with node paths, and the inputs to push for it (those that exist here)."""
    out = dict(cfg)
    items: list[Item] = []

    def mapped(path: Optional[str], push: bool = True) -> Optional[str]:
        if not path:
            return path
        np = node_path(path, run_dir)
        if push and os.path.exists(path):
            items.append(Item(path, np))
        return np

    out["run_dir"] = node_run_root(run_dir)
    out["out_dir"] = mapped(cfg["out_dir"], push=False)
    out["model_dir"] = mapped(cfg["model_dir"])
    out["tokenizer_dir"] = mapped(cfg["tokenizer_dir"])
    out["resume_from"] = mapped(cfg.get("resume_from"))
    out["sources"] = {n: {**s, "dir": mapped(s["dir"])} for n, s in cfg["sources"].items()}
    out["node_local_dirs"] = True  # each node writes its own checkpoint directories (engine/train.py)
    seen, uniq = set(), []
    for it in items:  # model_dir and tokenizer_dir are often the same directory
        if it.remote not in seen:
            seen.add(it.remote)
            uniq.append(it)
    return out, uniq


def rsync_path(workdir: str, rel: str) -> str:
    """`rel` under a node's workdir as rsync's remote side takes it (relative paths: the home dir)."""
    w = workdir.rstrip("/") or "/"
    if w == "~":
        return rel
    if w.startswith("~/"):
        w = w[2:]
    out = str(PurePosixPath(w) / rel) if rel else w
    return out + "/" if rel.endswith("/") else out


def rsh(ssh_argv: Sequence[str]) -> str:
    """rsync's `-e` string for an ssh argv: rsync splits it on spaces and honours quotes (no backslashes)."""
    words = []
    for a in ssh_argv:
        if a and not re.search(r"[\s'\"]", a):
            words.append(a)
        elif "'" not in a:
            words.append(f"'{a}'")
        elif '"' not in a:
            words.append(f'"{a}"')
        else:
            raise LaunchError(f"ssh option {a!r} has both quote kinds: rsync cannot pass it")
    return " ".join(words)


@dataclass
class Transfer:
    """What one rsync moved: `literal` = file bytes really sent (0 when the node already had them)."""

    literal: int = 0
    total_size: int = 0  # size of the files considered
    transferred_size: int = 0  # size of the files that differed
    sent: int = 0  # on the wire, protocol included
    seconds: float = 0.0

    def add(self, o: "Transfer") -> None:
        for k in ("literal", "total_size", "transferred_size", "sent", "seconds"):
            setattr(self, k, getattr(self, k) + getattr(o, k))


def _stats(text: str) -> Transfer:
    v = {k: int(n.replace(",", "")) for k, n in _STAT.findall(text)}
    return Transfer(v.get("Literal data", 0), v.get("Total file size", 0), v.get("Total transferred file size", 0),
                    v.get("Total bytes sent", 0))


def rsync(src: str, dst: str, ssh_argv: Sequence[str], *, what: str, extra: Sequence[str] = (),
          progress: Optional[Callable[[int, int, str, str], None]] = None, timeout: float = 24 * 3600,
          missing_ok: bool = False) -> Optional[Transfer]:
    """Run one rsync (argv list, no shell). `progress(bytes, percent, rate, eta)` per progress line.
    Returns the transfer's stats; None if `missing_ok` and the source does not exist. Raises LaunchError."""
    argv = ["rsync", *RSYNC_FLAGS, *extra, "-e", rsh(ssh_argv), "--", src, dst]
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, buf = [], b""
    assert p.stdout is not None
    while True:
        chunk = p.stdout.read1(65536) if hasattr(p.stdout, "read1") else p.stdout.read(65536)
        if not chunk:
            break
        buf += chunk
        *parts, buf = re.split(rb"[\r\n]", buf)
        for part in parts:
            line = part.decode(errors="replace")
            out.append(line)
            m = _PROGRESS.match(line)
            if m and progress:
                progress(int(m.group(1).replace(",", "")), int(m.group(2)), m.group(3), m.group(4))
    out.append(buf.decode(errors="replace"))
    try:
        err = p.stderr.read().decode(errors="replace")
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise LaunchError(f"{what}: rsync timed out") from None
    if rc == 23 and missing_ok and ("No such file" in err or "change_dir" in err):
        return None
    if rc != 0:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        raise LaunchError(f"{what}: rsync failed (exit {rc}): {lines[-1] if lines else ''}")
    t = _stats("\n".join(out))
    t.seconds = time.monotonic() - t0
    return t


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def mkdir_script(workdir_word: str, rels: Sequence[str]) -> str:
    """`cd -- WORKDIR && mkdir -p -- REL...` (each word quoted once)."""
    return f"cd -- {workdir_word} && mkdir -p -- " + " ".join(shlex.quote(r) for r in rels)


# --------------------------------------------------------------------------- disk needed, before preparation


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def planned_bytes(preset, plan: dict) -> dict[str, int]:
    """A LOWER bound of what a run writes into each node's workdir, knowable before data preparation
    (the preflight's disk check): the starting model (its directory's size, or parameters × dtype
    bytes), a tokenizer directory given by path, the token shards (the plan's training tokens per
    source, each source's val_tokens, 2 bytes a token), and the checkpoints the largest stage without
    ZeRO keeps at once (weights + optimizer state from the plan's memory model, times the saves its
    step cadence makes, the end's included, up to keep_last; a time cadence counts only the end's).
    Never more than the run really needs, so a refusal is always right; after preparation
    `prepare_stage` checks exactly. Rank 0's node also holds the exported models: `final_bytes`."""
    m = preset.model
    per_param = _bytes_per_param(preset)
    params = max((s.get("params") or {}).get("total") or 0 for s in plan["stages"]) if plan.get("stages") else 0
    if m.path and os.path.isdir(os.path.expanduser(m.path)):
        model = _dir_bytes(os.path.expanduser(m.path))
    else:
        model = params * per_param
    tok = preset.tokenizer.path
    tok = os.path.expanduser(tok) if tok and tok != m.path else None
    tokenizer = _dir_bytes(tok) if tok and os.path.isdir(tok) else 0
    drawn: dict[str, int] = {}
    for st in plan.get("stages", []):
        for s in (st.get("mixture") or {}).get("sources", []):
            tokens = s.get("tokens") or 0
            if s.get("epochs") and s["epochs"] > 1:  # repeated data: its unique tokens only
                tokens = int(tokens / s["epochs"])
            drawn[s["source"]] = max(drawn.get(s["source"], 0), tokens)
    shards = 2 * sum(drawn.get(n, 0) + (src.val_tokens or 0) for n, src in preset.sources.items())
    checkpoints = 0
    for st, spec in zip(plan.get("stages", []), preset.stages):
        b = ((st.get("memory") or {}).get("bytes") or {})
        if spec.zero_stage == 0 and spec.checkpoint.enabled:
            one = int(b.get("params", 0)) + int(b.get("optimizer", 0))
            checkpoints = max(checkpoints, one * _kept_checkpoints(spec.checkpoint, st))
    return {"model": model, "tokenizer": tokenizer, "token shards": shards, "checkpoints": checkpoints}


def _bytes_per_param(preset) -> int:
    """A weight's bytes in the model's dtype: fp32 4, anything else (bf16, fp16, auto) at least 2."""
    return 4 if preset.model.dtype == "float32" else 2


def _kept_checkpoints(c, st: dict) -> int:
    """The checkpoints a stage holds at once, at the least (see planned_bytes)."""
    steps, per_step = st.get("steps") or 0, st.get("tokens_per_step") or 0
    every = c.every_steps or (-(-c.every_tokens // per_step) if c.every_tokens and per_step else None)
    saves = -(-steps // every) if every and steps else 1
    return max(1, min(c.keep_last, saves))


def final_bytes(preset, plan: dict) -> int:
    """A lower bound of the exported models rank 0's node keeps (each stage's final/: the merged model in
    the model's dtype; a LoRA stage's counted without its adapters and trained copies)."""
    per_param = _bytes_per_param(preset)
    total = 0
    for st in plan.get("stages", []):
        p = st.get("params") or {}
        n = (p.get("total") or 0) - ((p.get("trainable") or 0) if st.get("lora") else 0)
        total += max(0, n) * per_param
    return total
