"""Reading documents from a source: jsonl(.gz/.zst), parquet, text, local HF datasets, builtins."""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
from pathlib import Path
from typing import Iterator

from engine.data.builtin import BUILTINS
from engine.spec import SourceSpec


class DataError(Exception):
    """Bad data or a bad path: the message names the file (and line) and what to do."""


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def expand_path(path: str) -> str:
    """`~` and `${VAR}` expansion; an unset variable is an error, not an empty string."""
    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in os.environ:
            raise DataError(f"path {path!r} uses ${{{name}}}, which is not set: export {name}=... first")
        return os.environ[name]
    return os.path.expanduser(_ENV.sub(sub, path))


def source_files(spec: SourceSpec) -> list[str]:
    """The files of a source, sorted; raises DataError naming the path when there are none."""
    if spec.path in BUILTINS:
        return [spec.path]
    path = expand_path(spec.path)
    if any(c in path for c in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    elif os.path.isdir(path):
        if _format(spec, path) == "hf":
            return [path]
        files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and _known(p.name))
    elif os.path.exists(path):
        files = [path]
    else:
        raise DataError(f"{path}: no such file or directory")
    if not files:
        raise DataError(f"{path}: no data files found (expected .jsonl, .jsonl.gz, .jsonl.zst, .parquet, .txt)")
    return files


def _known(name: str) -> bool:
    return name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".parquet", ".txt", ".txt.gz"))


def _format(spec: SourceSpec, path: str) -> str:
    if spec.format != "auto":
        return spec.format
    if os.path.isdir(path) and (Path(path) / "dataset_info.json").exists() or Path(path, "state.json").exists():
        return "hf"
    name = path.lower()
    if ".jsonl" in name or name.endswith((".json", ".json.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _open_text(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="strict", newline="")
    if path.endswith(".zst"):
        import zstandard
        raw = open(path, "rb")
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8", newline="")
    return open(path, "r", encoding="utf-8", errors="strict", newline="")


class Counters:
    """What was skipped and why, reported after preparation."""

    def __init__(self) -> None:
        self.docs = 0
        self.skipped: dict[str, int] = {}
        self.first_error: dict[str, str] = {}

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.first_error.setdefault(reason, where)


def read_documents(spec: SourceSpec, name: str, counters: Counters | None = None) -> Iterator[str]:
    """Yield the documents of a source in a deterministic order."""
    counters = counters or Counters()
    for path in source_files(spec):
        if path in BUILTINS:
            yield from BUILTINS[path]()
            continue
        fmt = _format(spec, path)
        try:
            if fmt == "jsonl":
                yield from _jsonl(spec, path, counters)
            elif fmt == "parquet":
                yield from _parquet(spec, path)
            elif fmt == "hf":
                yield from _hf(spec, path)
            else:
                with _open_text(path) as f:
                    text = f.read()
                if text.strip():
                    yield text
                else:
                    counters.skip("empty document", path)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: invalid UTF-8 at byte {e.start} ({e.reason}); re-encode the file as UTF-8") from None
        except PermissionError:
            raise DataError(f"{path}: permission denied; make the file readable") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _jsonl(spec: SourceSpec, path: str, counters: Counters) -> Iterator[str]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if spec.on_error == "fail":
                    raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}); fix the line or set on_error: skip") from None
                counters.skip("malformed JSON", f"{path}:{lineno}")
                continue
            text = rec.get(spec.text_field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                if spec.on_error == "fail":
                    raise DataError(f"{path}:{lineno}: no string field {spec.text_field!r}; set text_field: to the right key") from None
                counters.skip(f"missing field {spec.text_field!r}", f"{path}:{lineno}")
                continue
            if not text.strip():
                counters.skip("empty document", f"{path}:{lineno}")
                continue
            yield text


def _parquet(spec: SourceSpec, path: str) -> Iterator[str]:
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(path)
    if spec.text_field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {spec.text_field!r} (columns: {pf.schema_arrow.names}); set text_field:")
    for batch in pf.iter_batches(columns=[spec.text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


def _hf(spec: SourceSpec, path: str) -> Iterator[str]:
    from datasets import load_from_disk
    ds = load_from_disk(path)
    if hasattr(ds, "keys"):  # DatasetDict: take the train split
        ds = ds["train"]
    if spec.text_field not in ds.column_names:
        raise DataError(f"{path}: no column {spec.text_field!r} (columns: {ds.column_names}); set text_field:")
    for text in ds[spec.text_field] if len(ds) < 10_000 else (r[spec.text_field] for r in ds):
        if text:
            yield text
