"""Architecture boundaries: engine/ never imports the manager, Textual or SQLite; the UI never imports torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_ENGINE = {"cpt_tui", "textual", "sqlite_utils", "sqlite3"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_engine_imports_nothing_from_manager_or_ui():
    files = list((ROOT / "engine").rglob("*.py"))
    assert files
    bad = {str(f.relative_to(ROOT)): _imports(f) & FORBIDDEN_IN_ENGINE for f in files}
    assert not {k: v for k, v in bad.items() if v}


def test_engine_modules_load_without_them():
    # Import every engine module in a process where the forbidden packages cannot be imported.
    code = (
        "import sys, importlib, pkgutil\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {sorted(FORBIDDEN_IN_ENGINE)!r}: raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import engine\n"
        "for m in pkgutil.walk_packages(engine.__path__, 'engine.'):\n"
        "    importlib.import_module(m.name)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_ui_and_cli_never_import_torch():  # nor lm_eval: benchmarks run in engine.evaluate, a subprocess
    code = (
        "import sys, importlib, pkgutil\n"
        "import cpt_tui.cli, cpt_tui.ui.app, cpt_tui.supervisor, cpt_tui.store, cpt_tui.backends, cpt_tui.lifecycle, engine.plan\n"
        "import cpt_tui.lifecycle, cpt_tui.fmt\n"
        "for m in pkgutil.walk_packages(cpt_tui.cli.__path__, 'cpt_tui.cli.'):\n"
        "    if m.name != 'cpt_tui.cli.__main__':\n"
        "        importlib.import_module(m.name)\n"
        "import cpt_tui.benchmarks, cpt_tui.ui.screens.detail, cpt_tui.ui.screens.compare\n"
        "heavy = [m for m in ('torch', 'transformers', 'accelerate', 'deepspeed', 'lm_eval') if m in sys.modules]\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
