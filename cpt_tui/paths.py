"""Where cpt-tui keeps things: XDG data home, overridable with CPT_TUI_HOME / CPT_TUI_DB / CPT_TUI_CACHE.

Presets: a name is looked up in the user preset directory ($CPT_TUI_HOME/presets, first: a user preset
of the same name wins) and then among the shipped presets. The shipped ones are the top-level
presets/ directory of the source tree, installed inside the package as `cpt_tui.builtin_presets`
(pyproject.toml maps that package to presets/): one copy, found the same way from a checkout, an
editable install or a wheel.
"""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_data_dir

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def builtin_presets_dir() -> Path:
    """The shipped presets: presets/ of the source checkout this module runs from, else the installed
    package cpt_tui.builtin_presets."""
    if (_SOURCE_ROOT / "pyproject.toml").is_file() and (_SOURCE_ROOT / "presets").is_dir():
        return _SOURCE_ROOT / "presets"
    from importlib.util import find_spec

    # A data-only (namespace) package: its directory. Wheels install as directories, so it is a real path.
    spec = find_spec("cpt_tui.builtin_presets")
    return Path(next(iter(spec.submodule_search_locations)))


REPO_PRESETS = builtin_presets_dir()  # (name kept for callers; it is not necessarily in a repository)


def home() -> Path:
    return Path(os.environ.get("CPT_TUI_HOME") or user_data_dir("cpt-tui", appauthor=False))


def db_path(override: str | None = None) -> Path:
    return Path(override or os.environ.get("CPT_TUI_DB") or home() / "cpt-tui.db")


def runs_dir() -> Path:
    return home() / "runs"


def cache_dir() -> Path:
    return Path(os.environ.get("CPT_TUI_CACHE") or home() / "cache")


def user_presets_dir() -> Path:
    return home() / "presets"


def preset_dirs() -> list[Path]:
    """Where preset names are looked up, in order."""
    return [user_presets_dir(), REPO_PRESETS]


def find_preset(name: str) -> Path:
    """A path to a preset file, or a preset name (with or without .yaml) in preset_dirs()."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    for d in preset_dirs():
        for cand in (d / name, d / f"{name}.yaml"):
            if cand.is_file():
                return cand
    raise FileNotFoundError(name)


def list_presets() -> list[Path]:
    """Every preset a name can refer to (a user preset hides a shipped one of the same name), by name."""
    found: dict[str, Path] = {}
    for d in preset_dirs():
        for p in sorted(d.glob("*.yaml")) if d.is_dir() else ():
            found.setdefault(p.stem, p)
    return [found[k] for k in sorted(found)]
