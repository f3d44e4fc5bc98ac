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
               PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
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
