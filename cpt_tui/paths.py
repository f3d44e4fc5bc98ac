"""Where cpt-tui keeps things: XDG data home, overridable with CPT_TUI_HOME / CPT_TUI_DB / CPT_TUI_CACHE."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_data_dir

REPO_PRESETS = Path(__file__).resolve().parent.parent / "presets"


def home() -> Path:
    return Path(os.environ.get("CPT_TUI_HOME") or user_data_dir("cpt-tui", appauthor=False))


def db_path(override: str | None = None) -> Path:
    return Path(override or os.environ.get("CPT_TUI_DB") or home() / "cpt-tui.db")


def runs_dir() -> Path:
    return home() / "runs"


def cache_dir() -> Path:
    return Path(os.environ.get("CPT_TUI_CACHE") or home() / "cache")


def find_preset(name: str) -> Path:
    """A preset name under presets/ (with or without .yaml), or a path."""
    p = Path(name).expanduser()
    if p.exists():
        return p
    for cand in (REPO_PRESETS / name, REPO_PRESETS / f"{name}.yaml"):
        if cand.exists():
            return cand
    raise FileNotFoundError(name)


def list_presets() -> list[Path]:
    return sorted(REPO_PRESETS.glob("*.yaml"))
