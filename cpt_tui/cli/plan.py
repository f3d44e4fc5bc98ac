"""`cpt-tui plan PRESET [--json] [--commands]`: the resolved plan, with epochs per source once the data
is prepared (the cache lookup), and the dry-run listing of launch commands the UI's launch screen shows too.
"""

from __future__ import annotations

import json

from cpt_tui import paths
from cpt_tui.presets import Invalid, load_checked


def plan_with_cache(preset, plan: dict) -> dict:
    """The plan resolved with the token counts of already-prepared sources (all of them), else unchanged."""
    from engine.data.run import cached_long_docs, cached_train_tokens, used_sources
    from engine.plan import PlanError, resolve

    cache = paths.cache_dir()
    tokens = cached_train_tokens(preset, cache)
    if not tokens or set(used_sources(preset)) - set(tokens):
        return plan
    long_docs = cached_long_docs(preset, cache) if any(st.long_docs for st in preset.stages) else None
    try:
        out = resolve(preset, tokens, strict=False, long_docs=long_docs)  # too little data for a step: a warning in the table
    except PlanError:
        return plan
    out["prepared_from_cache"] = True
    return out


def cmd_plan(a) -> int:
    from cpt_tui.backends import LaunchError, dry_run
    from engine.plan import format_plan

    path, preset, plan = load_checked(a.preset, check_paths=False)
    plan = plan_with_cache(preset, plan)  # epochs per source once the data is prepared
    if a.commands:
        try:
            plan["commands"] = dry_run(preset)
        except LaunchError as e:
            raise Invalid(f"{path}: cluster: {e}") from None
    if a.json:
        print(json.dumps(plan, indent=1))
    else:
        print(format_plan(plan))
        for name, text in plan.get("commands", {}).items():
            print(f"\ncommands for stage {name}:\n{text}")
    return 0
