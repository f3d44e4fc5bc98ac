"""Finding and validating a preset before anything is started (CLI `--run`, `plan`, the UI's launch screen).

Never imports torch. `Invalid` messages are complete and user-facing (file, YAML path, line, fix).
"""

from __future__ import annotations

from engine.errors import UserError
from cpt_tui import paths


class Invalid(UserError):
    """Invalid input: the message is complete and user-facing (the CLI exits 2)."""


def load_checked(name: str, check_paths: bool):
    """Find, validate and resolve a preset; raise Invalid naming file, YAML path and line.

    Returns (path, preset, plan)."""
    from engine.plan import PlanError, missing_paths, resolve
    from engine.spec import PresetError, load_preset, preset_error_at

    try:
        path = paths.find_preset(name)
    except FileNotFoundError:
        known = ", ".join(p.stem for p in paths.list_presets())
        raise Invalid(f"{name}: no such preset file, and not a preset name (known: {known})") from None
    try:
        preset = load_preset(path)
        plan = resolve(preset)
    except PresetError as e:
        raise Invalid(str(e)) from None
    except PlanError as e:
        raise Invalid(str(preset_error_at(path, e.yaml_path, e.msg))) from None
    from cpt_tui.benchmarks import check_preset
    try:
        check_preset(path, preset)  # task names against lm-eval's registry (a subprocess unless all local)
    except PresetError as e:
        raise Invalid(str(e)) from None
    if check_paths:
        missing = missing_paths(preset)
        if missing:
            yp, msg = missing[0]
            raise Invalid(str(preset_error_at(path, yp, msg)) + "\n  (fix this path; nothing was started)")
    return path, preset, plan
