"""The stage JSON's `trackers` block (engine/trackers.py reads it in the trainer). Pure Python: the
plan, and so the CLI and the UI, import this; never accelerate or a tracker library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

_NOT_CONFIG = ("env", "notify")  # keys whose values never leave the preset (secrets)


# --------------------------------------------------------------------------- the stage JSON block


def flat_config(preset) -> dict[str, Any]:
    """The resolved preset as flat `a.b.0.c` → bool/int/float/str (what every tracker accepts)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, v):
        if isinstance(v, dict):
            for k, x in v.items():
                if k not in _NOT_CONFIG:
                    walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, list) and v and any(isinstance(x, (dict, list)) for x in v):
            for i, x in enumerate(v):
                walk(f"{prefix}.{i}", x)
        elif isinstance(v, (bool, int, float, str)):
            out[prefix] = v
        else:  # None, flat lists
            out[prefix] = json.dumps(v)

    walk("", preset.model_dump(mode="json", by_alias=True))
    return out


def stage_block(preset, index: int, run_dir, prepared: dict) -> Optional[dict]:
    """The stage JSON's `trackers` field (None without trackers): what rank 0 needs to log this stage
    into the run's tracker runs."""
    if not preset.trackers:
        return None
    from engine.plan import resolve

    plan = resolve(preset, {n: s["train_tokens"] for n, s in prepared["sources"].items()})
    before = plan["stages"][:index]
    return {
        "run_id": Path(run_dir).name,
        "run_dir": str(run_dir),
        "stage_index": index,
        "stage_name": preset.stages[index].name,
        "step_offset": sum(s["steps"] or 0 for s in before),
        "tokens_offset": sum(s["tokens"] or 0 for s in before),
        "trackers": [t.model_dump(mode="json") for t in preset.trackers],
        "config": flat_config(preset),
    }
