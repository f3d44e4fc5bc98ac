"""Shared fixtures: an isolated cpt-tui home, and ONE real tiny-demo run through the CLI per session.

Expensive things (the demo run, prepared data, trained tokenizers) are made once and shared, so the
suite stays fast as it grows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli_env(home: Path, cache: Path) -> dict:
    env = dict(os.environ)
    env.update(CPT_TUI_HOME=str(home), CPT_TUI_CACHE=str(cache), CPT_TUI_DB=str(home / "cpt-tui.db"),
               PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(cache / "hf-datasets"))  # lm-eval's local tasks: not the user's cache
    return env


def run_cli(args: list[str], env: dict, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cpt_tui.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, **kw)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """Prepared data and tokenizers, shared by every test of the session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def cpt_home(tmp_path, shared_cache):
    """A fresh, empty cpt-tui home (database, runs) that still shares the prepared-data cache."""
    home = tmp_path / "home"
    home.mkdir()
    return cli_env(home, shared_cache)


@dataclass
class DemoRun:
    result: subprocess.CompletedProcess
    env: dict
    db: Path
    seconds: float

    @property
    def run_id(self) -> str:
        for line in self.result.stdout.splitlines():
            if line.startswith("run "):
                return line.split()[1]
        raise AssertionError(self.result.stdout)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, shared_cache) -> DemoRun:
    home = tmp_path_factory.mktemp("demo-home")
    env = cli_env(home, shared_cache)
    t0 = time.time()
    res = run_cli(["--run", "tiny-demo"], env)
    return DemoRun(res, env, home / "cpt-tui.db", time.time() - t0)


# --------------------------------------------------------------------------- a tiny preset for supervisor tests


def tiny_preset(path: Path, stages=(("s1", 100),), *, every: int = 20, cluster: dict | None = None,
                micro: int = 8, name: str = "tiny-sup") -> Path:
    """A tiny preset (Llama, hidden 32, 1 layer, vocab 300): each stage trains `steps` steps of
    8 × 32 tokens, logs every step and checkpoints every `every` steps. Its source is named `tprose`
    so its prepared data never collides with the demo's in the shared cache."""
    import yaml

    doc = {
        "name": name, "seed": 7,
        "model": {"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "max_position_embeddings": 64}},
        "tokenizer": {"train": {"sources": ["tprose"], "vocab_size": 300, "max_chars": 200000}},
        "sources": {"tprose": {"path": "builtin:stdlib-prose", "val_tokens": 1024, "max_tokens": 200000}},
        "stages": [{"name": n, "mixture": {"weights": {"tprose": 1.0}, "tokens": steps * 8 * 32}, "seq_len": 32,
                    "micro_batch_size": micro, "global_batch_size": 8, "precision": "fp32",
                    "schedule": {"name": "cosine", "lr": 3.0e-3, "warmup_steps": 5},
                    "eval": {"every_steps": 1000, "max_blocks": 4},
                    "checkpoint": {"every_steps": every, "keep_last": 2}, "log_every": 1}
                   for n, steps in stages],
    }
    if cluster:
        doc["cluster"] = cluster
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def wait_for(pred, timeout: float, what: str, every: float = 0.3):
    """Poll `pred()` until it returns something truthy (returned); fail naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
