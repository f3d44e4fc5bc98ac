"""`cpt-tui presets [--json]`: the presets a name can refer to — the user's ($CPT_TUI_HOME/presets)
and the shipped ones — with name, description and seed (read from the YAML, not validated: `cpt-tui
plan NAME` validates one)."""

from __future__ import annotations

import json

from cpt_tui import paths


def preset_rows() -> list[dict]:
    import yaml

    user = paths.user_presets_dir()
    rows = []
    for p in paths.list_presets():
        row = {"name": p.stem, "description": "", "seed": None, "where": "user" if p.parent == user else "shipped",
               "path": str(p)}
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            row["description"] = f"(unreadable: {type(e).__name__})"
            data = None
        if isinstance(data, dict):
            row.update(description=str(data.get("description") or ""), seed=data.get("seed", 1234))
        rows.append(row)
    return rows


def cmd_presets(a) -> int:
    rows = preset_rows()
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    w = max([len(r["name"]) for r in rows] + [4])
    print(f"{'name':<{w}}  {'seed':>6}  {'from':<7}  description")
    for r in rows:
        seed = "" if r["seed"] is None else str(r["seed"])
        print(f"{r['name']:<{w}}  {seed:>6}  {r['where']:<7}  {r['description']}")
    print(f"\n(user presets: {paths.user_presets_dir()}; any preset file can also be given by path)")
    return 0
