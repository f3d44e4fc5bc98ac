"""Corpora every Python installation has: standard-library docstrings (English prose) and source (code).

They make the tiny demo and the tests independent of any download. Files are read as text and
parsed with `ast` (nothing is imported), in sorted order, so the corpus is deterministic for a
given Python version.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path
from typing import Iterator

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__", "turtledemo"}


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not (_SKIP_DIRS & set(p.relative_to(root).parts[:-1]))]
    return sorted(files)


def stdlib_prose() -> Iterator[str]:
    """Docstrings of modules, classes and functions: English prose."""
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    yield doc


def stdlib_code() -> Iterator[str]:
    """Source files, one document per top-level function or class (files are too long to be one)."""
    for path in _stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        lines = text.splitlines()
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno:
                yield "\n".join(lines[node.lineno - 1 : node.end_lineno])


BUILTINS = {"builtin:stdlib-prose": stdlib_prose, "builtin:stdlib-code": stdlib_code}
