"""Reading documents from a source: jsonl(.gz/.zst), parquet, text, local HF datasets, builtins.

`SourceReader.documents(start)` yields `(position, text)`; a position is (file index, record index
within the file). Resuming after a position skips earlier files unopened and earlier records
unparsed, so a resumed preparation neither re-reads much nor re-counts skipped records.
Bad records (malformed JSON, missing field, invalid UTF-8, empty text) are counted with their
first `file:line`, or raise DataError when the source says `on_error: fail`. Files that cannot be
read at all always raise DataError.
"""

from __future__ import annotations

from engine.errors import UserError
import glob
import gzip
import io
import json
import os
import re
from pathlib import Path
from typing import Iterator, Optional

from engine.data.builtin import BUILTINS
from engine.spec import SourceSpec

Position = tuple[int, int]  # (file index, record index within the file)


_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n\s*")  # a blank line (and any further ones) between paragraphs


class DataError(UserError):
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
    if spec.format in ("mds", "datatrove", "megatron", "tokens"):  # already tokenized: engine.data.foreign
        from engine.data.foreign import foreign_files
        return foreign_files(spec)
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
    return name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".parquet",
                          ".txt", ".txt.gz", ".txt.zst"))


def _format(spec: SourceSpec, path: str) -> str:
    if spec.format != "auto":
        return spec.format
    if os.path.isdir(path) and ((Path(path) / "dataset_info.json").exists() or (Path(path) / "state.json").exists()
                                or (Path(path) / "dataset_dict.json").exists()):
        return "hf"
    name = path.lower()
    if ".jsonl" in name or name.endswith((".json", ".json.gz", ".json.zst")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


try:
    import orjson as _orjson
except ImportError:  # (a declared dependency; the standard library's parser is the fallback)
    _orjson = None


def _loads(line: bytes):
    """json.loads of one JSON line, by orjson when it can: a line orjson refuses (a lone surrogate
    escape, NaN, a huge integer, UTF-16, invalid UTF-8 or JSON) is parsed by json.loads, which gives
    the same result or the same error as before."""
    if _orjson is not None:
        try:
            return _orjson.loads(line)
        except Exception:
            pass
    return json.loads(line)


def _open_binary(path: str, raw: io.BufferedReader) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if path.endswith(".zst"):
        import zstandard
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw), 1 << 20)
    return raw


class Counters:
    """What was read, what was skipped and why (with the first place each reason occurred)."""

    def __init__(self) -> None:
        self.docs = 0
        self.skipped: dict[str, int] = {}
        self.first_error: dict[str, str] = {}

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.first_error.setdefault(reason, where)

    def snapshot(self) -> dict:
        return {"docs": self.docs, "skipped": dict(self.skipped), "first_error": dict(self.first_error)}

    @classmethod
    def restore(cls, snap: dict) -> "Counters":
        c = cls()
        c.docs, c.skipped, c.first_error = snap["docs"], dict(snap["skipped"]), dict(snap["first_error"])
        return c


class SourceReader:
    """Documents of one source in a deterministic order, with positions and a byte count for progress."""

    def __init__(self, spec: SourceSpec, name: str, counters: Optional[Counters] = None):
        self.spec, self.name = spec, name
        self.counters = counters or Counters()
        self.files = source_files(spec)
        self.sizes = [os.path.getsize(f) if os.path.isfile(f) else 0 for f in self.files]
        self.total_bytes = sum(self.sizes)
        self._done_bytes = 0
        self._raw: Optional[io.BufferedReader] = None

    def bytes_read(self) -> int:
        try:
            return self._done_bytes + (self._raw.tell() if self._raw is not None and not self._raw.closed else 0)
        except (OSError, ValueError):
            return self._done_bytes

    def documents(self, after: Optional[Position] = None) -> Iterator[tuple[Position, str]]:
        for fi, path in enumerate(self.files):
            if after is not None and fi < after[0]:
                self._done_bytes += self.sizes[fi]
                continue
            skip = after[1] + 1 if after is not None and fi == after[0] else 0
            try:
                if path in BUILTINS:
                    recs = enumerate(BUILTINS[path]())
                    for ri, text in recs:
                        if ri >= skip:
                            yield (fi, ri), text
                    continue
                fmt = _format(self.spec, path)
                gen = {"jsonl": self._jsonl, "parquet": self._parquet, "hf": self._hf}.get(fmt, self._text)
                for ri, text in gen(path, skip):
                    yield (fi, ri), text
            except PermissionError:
                raise DataError(f"{path}: permission denied; make the file readable") from None
            except DataError:
                raise
            except OSError as e:
                raise DataError(f"{path}: cannot read ({e.strerror or e}); fix or remove the file") from None
            finally:
                self._raw = None
            self._done_bytes += self.sizes[fi]

    # ---------------------------------------------------------------- formats
    def _bad(self, reason: str, where: str, fix: str) -> None:
        if self.spec.on_error == "fail":
            raise DataError(f"{where}: {reason}; {fix}")
        self.counters.skip(reason, where)

    def _jsonl(self, path: str, skip: int) -> Iterator[tuple[int, str]]:
        field = self.spec.text_field
        with open(path, "rb") as raw:
            self._raw = raw
            with _open_binary(path, raw) as f:
                for ri, line in enumerate(f):
                    if ri < skip or not line.strip():
                        continue
                    try:
                        rec = _loads(line)
                    except UnicodeDecodeError as e:
                        self._bad("invalid UTF-8", f"{path}:{ri + 1}",
                                  f"byte {e.start} of the line ({e.reason}); re-encode the file as UTF-8 or set on_error: skip")
                        continue
                    except ValueError as e:
                        self._bad("malformed JSON", f"{path}:{ri + 1}",
                                  f"{getattr(e, 'msg', e)}; fix the line or set on_error: skip")
                        continue
                    text = rec.get(field) if isinstance(rec, dict) else None
                    if not isinstance(text, str):
                        self._bad(f"missing text field {field!r}", f"{path}:{ri + 1}",
                                  f"set text_field: to the key that holds the text, or on_error: skip")
                        continue
                    if not text or text.isspace():  # (= not text.strip(), without copying the text)
                        self.counters.skip("empty document", f"{path}:{ri + 1}")
                        continue
                    yield ri, text

    def _text(self, path: str, skip: int) -> Iterator[tuple[int, str]]:
        # sample_by document: the file is record 0; paragraph / line: record i is the i-th piece.
        by = self.spec.sample_by
        if skip and by == "document":
            return
        with open(path, "rb") as raw:
            self._raw = raw
            with _open_binary(path, raw) as f:
                data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            self._bad("invalid UTF-8", path, f"byte {e.start} ({e.reason}); re-encode the file as UTF-8 or set on_error: skip")
            return
        if by != "document":
            pieces = _PARAGRAPH.split(text.rstrip("\r\n")) if by == "paragraph" else text.splitlines()
            yield from ((ri, p) for ri, p in enumerate(pieces) if ri >= skip and p.strip())
        elif text.strip():
            yield 0, text
        else:
            self.counters.skip("empty document", path)

    def _parquet(self, path: str, skip: int) -> Iterator[tuple[int, str]]:
        import pyarrow.parquet as pq
        try:
            pf = pq.ParquetFile(path)
        except OSError:
            raise
        except Exception as e:  # pyarrow raises ArrowInvalid for a corrupt file
            raise DataError(f"{path}: not a readable parquet file ({e}); fix or remove it") from None
        field = self.spec.text_field
        if field not in pf.schema_arrow.names:
            raise DataError(f"{path}: no column {field!r} (columns: {pf.schema_arrow.names}); set text_field:")
        ri = 0
        for batch in pf.iter_batches(columns=[field], batch_size=8192):
            if ri + batch.num_rows <= skip:  # resume: whole batches before the position are not converted
                ri += batch.num_rows
                continue
            for text in batch.column(0).to_pylist():
                if ri >= skip:
                    if not isinstance(text, str) or not text.strip():
                        self.counters.skip("empty document", f"{path}:row {ri}")
                    else:
                        yield ri, text
                ri += 1

    def _hf(self, path: str, skip: int) -> Iterator[tuple[int, str]]:
        from datasets import load_from_disk
        ds = load_from_disk(path)
        if hasattr(ds, "keys"):  # DatasetDict: take the train split
            ds = ds["train"]
        field = self.spec.text_field
        if field not in ds.column_names:
            raise DataError(f"{path}: no column {field!r} (columns: {ds.column_names}); set text_field:")
        for start in range(skip, len(ds), 4096):  # batched column reads: bounded memory
            for i, text in enumerate(ds[start:start + 4096][field]):
                if not isinstance(text, str) or not text.strip():
                    self.counters.skip("empty document", f"{path}:row {start + i}")
                else:
                    yield start + i, text


def read_documents(spec: SourceSpec, name: str, counters: Counters | None = None) -> Iterator[str]:
    """Yield the documents of a source in a deterministic order (tokenizer training, vocabulary)."""
    for _, text in SourceReader(spec, name, counters).documents():
        yield text
