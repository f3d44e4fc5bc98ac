"""The layer contracts as code: `lint-imports` checks the import-linter contracts in pyproject.toml
(engine standalone, no torch & co. in the UI/CLI, SQLite only in the store) over every module,
imports inside functions included; and no module but the store runs SQL through the store's connection."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Modules of the launch slice that still run SQL through `store.db` (issue 11): to be emptied there.
SQL_PENDING: set[str] = set()


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "import-linter is not installed (pip install -e '.[test]')"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "0 broken" in r.stdout, r.stdout + r.stderr


def _sql_uses(path: Path) -> list[str]:
    """`x.db.execute / .query / .conn`, `.conn.execute(many)`: SQL run around the store's API."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            if node.value.attr == "db" and node.attr in ("execute", "query", "conn", "executescript"):
                out.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            elif node.value.attr == "conn" and node.attr in ("execute", "executemany"):
                out.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return out


def test_only_the_store_runs_sql():
    uses = [u for f in sorted((ROOT / "cpt_tui").rglob("*.py"))
            if f.name != "store.py" and str(f.relative_to(ROOT)) not in SQL_PENDING for u in _sql_uses(f)]
    assert not uses, f"SQL outside cpt_tui/store.py (add a Store method instead): {uses}"
