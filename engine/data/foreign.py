"""Already-tokenized sources: MDS (mosaicml-streaming / LLM-Foundry), datatrove/nanotron `.ds`,
Megatron-LM indexed datasets (`.bin` + `.idx`) and token-id parquet / jsonl (`format: tokens`).

Nothing is re-tokenized. Each file is memory-mapped (MDS zstd shards are decompressed in memory, one
shard at a time) and handed to the same router as text in large batches `(flat tokens, document
lengths)`: validation split, max_tokens, epochs and the boundary index behave as for text, and the
prepared form is the same flat stream + manifest (one reader path for stages). The Python work is
per batch (and per parquet row group / MDS shard), never per token.

EOS: a text source gets one EOS after every document. A foreign file already holds what its writer
put there, so no second EOS is added: where the format knows document boundaries (datatrove,
Megatron, per-document token rows) a document that does not already end with the preset's EOS gets
one; where it does not (MDS samples packed by LLM-Foundry's --concat_tokens, pre-grouped
fixed-length rows) the tokens are taken exactly as written, and the manifest says
`boundaries_known: false` (each sample / row is then the unit for val_tokens and max_tokens).

Tokenizer check (before anything is written where the format records it, else per batch): every id
must be < the preset tokenizer's vocabulary size; datatrove's `.metadata` records the tokenizer name
and token size; Megatron's dtype bounds the vocabulary; documents that all end in the same id that is
not the preset's EOS betray another tokenizer. A mismatch is a DataError naming the file and both
values, or a warning with `tokenizer_check: warn`.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from engine.data.sources import DataError, expand_path
from engine.spec import SourceSpec

FOREIGN_FORMATS = ("mds", "datatrove", "megatron", "tokens")
BATCH_TOKENS = 1 << 24  # tokens handed to the router at once
JSONL_PIECE_BYTES = 64 << 20  # a token jsonl is read in pieces of about this size (CPT_TOKENS_JSONL_PIECE)

MEGATRON_DTYPES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f4", 8: "<u2"}
MDS_DTYPE_CODES = {8: "u1", 9: "i1", 16: "<u2", 17: "<i2", 32: "<u4", 33: "<i4", 64: "<u8", 65: "<i8"}


def is_foreign(spec: SourceSpec) -> bool:
    return spec.format in FOREIGN_FORMATS


@dataclass
class Unit:
    """One readable piece of a foreign source (a .ds file, a Megatron prefix, an MDS shard, a parquet file)."""

    path: str  # what error messages name
    files: list[str]  # every file it reads (for the content key)
    load: Callable[[], tuple[np.ndarray, Optional[np.ndarray]]] = field(repr=False)
    # load() -> (tokens, end offsets of documents / samples / rows (or None), whether they are documents)
    eos_check: bool = False  # the writer conventionally ends documents with EOS (datatrove, Megatron)
    meta: dict = field(default_factory=dict)
    nbytes: Optional[int] = None  # the bytes it covers (progress), when not its files' whole size


# --------------------------------------------------------------------------- file discovery


def _paths(spec: SourceSpec, pattern: str) -> list[str]:
    path = expand_path(spec.path)
    if any(c in path for c in "*?["):
        found = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    elif os.path.isdir(path):
        found = sorted(str(p) for p in Path(path).rglob(pattern) if p.is_file())
    elif os.path.exists(path):
        found = [path]
    else:
        raise DataError(f"{path}: no such file or directory")
    if not found:
        raise DataError(f"{path}: no {pattern} files found for format: {spec.format}")
    return found


def units(spec: SourceSpec) -> list[Unit]:
    fmt = spec.format
    if fmt == "datatrove":
        return [_datatrove_unit(p) for p in _paths(spec, "*.ds") if p.endswith(".ds")]
    if fmt == "megatron":
        prefixes = []
        for p in _paths(spec, "*.idx") if not os.path.exists(expand_path(spec.path) + ".idx") else [expand_path(spec.path) + ".idx"]:
            pre = p[:-4] if p.endswith((".idx", ".bin")) else p
            if pre not in prefixes:
                prefixes.append(pre)
        return [_megatron_unit(p) for p in prefixes]
    if fmt == "mds":
        out = []
        for idx in _paths(spec, "index.json"):
            if os.path.basename(idx) != "index.json":
                idx = os.path.join(idx if os.path.isdir(idx) else os.path.dirname(idx), "index.json")
            out += _mds_units(idx)
        return out
    if fmt == "tokens":
        found = [p for p in _paths(spec, "*") if p.endswith((".parquet", ".jsonl", ".json", ".jsonl.gz", ".jsonl.zst"))]
        if not found:
            raise DataError(f"{expand_path(spec.path)}: no .parquet or .jsonl files found for format: tokens")
        return [u for p in found for u in _tokens_units(p, spec.ids_field)]
    raise ValueError(fmt)


def foreign_files(spec: SourceSpec) -> list[str]:
    return list(dict.fromkeys(f for u in units(spec) for f in u.files))


# --------------------------------------------------------------------------- datatrove


def _datatrove_unit(path: str) -> Unit:
    meta_path, index_path = path + ".metadata", path + ".index"
    name, token_size = None, None
    if os.path.exists(meta_path):
        first = Path(meta_path).read_text(errors="replace").split("\n")[0]
        parts = first.split("|")
        if len(parts) >= 2 and parts[-1].strip() in ("2", "4"):
            token_size = int(parts[-1])
            name = "|".join(parts[:-1])
            if name.startswith("Unknown Tokenizer"):
                name = None
        else:
            raise DataError(f"{meta_path}: not a datatrove metadata file (first line {first[:80]!r}, expected "
                            "'<tokenizer>|<token_size>'); fix or remove it")
    if token_size is None:
        raise DataError(f"{path}: no {os.path.basename(meta_path)} beside it, so the token size (2 or 4 bytes) is "
                        "unknown; copy the .metadata file datatrove wrote")
    dtype = np.dtype("<u2" if token_size == 2 else "<u4")

    def load():
        size = os.path.getsize(path)
        if size % dtype.itemsize:
            raise DataError(f"{path}: {size} bytes is not a whole number of {dtype.itemsize}-byte tokens: the file is "
                            "truncated or corrupt; re-copy it")
        tokens = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
        ends = None
        if os.path.exists(index_path):
            isz = os.path.getsize(index_path)
            if isz % 8:
                raise DataError(f"{index_path}: {isz} bytes is not a whole number of uint64 offsets: truncated or "
                                "corrupt; re-copy it")
            ends = np.fromfile(index_path, "<u8").astype(np.int64)
            if len(ends) and (ends[-1] != len(tokens) or (np.diff(ends) < 0).any()):
                raise DataError(f"{path}: the index {os.path.basename(index_path)} ends at token {int(ends[-1]):,} but "
                                f"the file holds {len(tokens):,} tokens: one of them is truncated or corrupt; re-copy both")
        return tokens, ends, ends is not None

    return Unit(path, [p for p in (path, index_path, meta_path) if os.path.exists(p)], load, eos_check=True,
                meta={"tokenizer_name": name, "token_size": token_size})


# --------------------------------------------------------------------------- Megatron


def _megatron_unit(prefix: str) -> Unit:
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for p in (idx_path, bin_path):
        if not os.path.exists(p):
            raise DataError(f"{p}: missing (a Megatron indexed dataset is a .bin and an .idx with the same prefix)")
    head = open(idx_path, "rb").read(34)
    if len(head) < 34 or head[:9] != b"MMIDIDX\x00\x00":
        raise DataError(f"{idx_path}: not a Megatron MMIDIDX index (bad magic or truncated header)")
    version = int(np.frombuffer(head, "<u8", 1, 9)[0])
    if version != 1:
        raise DataError(f"{idx_path}: index version {version}, only version 1 is known")
    if head[17] not in MEGATRON_DTYPES or head[17] in (6, 7):
        raise DataError(f"{idx_path}: dtype code {head[17]} is not an integer token type")
    dtype = np.dtype(MEGATRON_DTYPES[head[17]])

    def load():
        idx = np.memmap(idx_path, dtype=np.uint8, mode="r")
        S, D = (int(x) for x in np.frombuffer(idx, "<u8", 2, 18))
        need = 34 + 12 * S + 8 * D
        if len(idx) < need:
            raise DataError(f"{idx_path}: {len(idx)} bytes, but its header announces {S:,} sequences and {D:,} document "
                            f"indices ({need:,} bytes): truncated or corrupt; re-copy it")
        lengths = np.frombuffer(idx, "<i4", S, 34).astype(np.int64)
        pointers = np.frombuffer(idx, "<i8", S, 34 + 4 * S)
        doc_idx = np.frombuffer(idx, "<i8", D, 34 + 12 * S)
        total = int(lengths.sum())
        size = os.path.getsize(bin_path)
        if size != total * dtype.itemsize:
            raise DataError(f"{bin_path}: {size:,} bytes, but {idx_path} describes {total:,} tokens of {dtype.name} "
                            f"({total * dtype.itemsize:,} bytes): truncated or corrupt; re-copy it")
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if S else np.zeros(0, np.int64)
        if S and not (pointers == starts * dtype.itemsize).all():
            raise DataError(f"{idx_path}: sequence pointers are not contiguous in {bin_path}: corrupt index")
        if D == 0 or doc_idx[0] != 0 or doc_idx[-1] != S or (np.diff(doc_idx) < 0).any():
            raise DataError(f"{idx_path}: document indices do not cover the {S:,} sequences: corrupt index")
        tokens = np.memmap(bin_path, dtype=dtype, mode="r") if total else np.zeros(0, dtype)
        seq_ends = np.cumsum(lengths)
        ends = np.where(doc_idx[1:] > 0, seq_ends[np.maximum(doc_idx[1:] - 1, 0)] if S else 0, 0).astype(np.int64)
        return tokens, ends, True

    return Unit(prefix, [idx_path, bin_path], load, eos_check=True, meta={"dtype": dtype.name})


# --------------------------------------------------------------------------- MDS


def _mds_units(index_path: str) -> list[Unit]:
    root = os.path.dirname(index_path)
    try:
        index = json.loads(Path(index_path).read_text())
        shards = index["shards"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{index_path}: not a readable MDS index.json ({e}); re-copy it") from None
    out = []
    for k, sh in enumerate(shards):
        if sh.get("format") != "mds":
            raise DataError(f"{index_path}: shard {k} has format {sh.get('format')!r}; only 'mds' is read")
        cols = sh["column_names"]
        if "tokens" not in cols:
            raise DataError(f"{index_path}: no 'tokens' column (columns: {cols}); format: mds reads the token "
                            "shards LLM-Foundry's converters write (--concat_tokens)")
        comp = sh.get("compression")
        if comp and comp.split(":")[0] != "zstd":
            raise DataError(f"{index_path}: shard compression {comp!r} is not supported (raw or zstd only)")
        fname = (sh["zip_data"] if comp else sh["raw_data"])["basename"]
        out.append(_mds_unit(os.path.join(root, fname), sh, bool(comp)))
    return out


def _mds_unit(path: str, sh: dict, compressed: bool) -> Unit:
    cols, encs, sizes = sh["column_names"], sh["column_encodings"], sh["column_sizes"]
    ci = cols.index("tokens")
    enc = encs[ci]
    var_cols = [i for i, s in enumerate(sizes) if s is None]
    if enc == "bytes":
        dtype, hdr = np.dtype("<i8"), "none"  # LLM-Foundry before PR #1254: np.asarray(list).tobytes()
    elif enc.startswith("ndarray"):
        parts = enc.split(":")
        if len(parts) == 3:
            dtype, hdr = np.dtype(parts[1]).newbyteorder("<"), "none"
        elif len(parts) == 2:
            dtype, hdr = np.dtype(parts[1]).newbyteorder("<"), "shape"
        else:
            dtype, hdr = None, "dtype+shape"
    else:
        raise DataError(f"{path}: tokens column encoding {enc!r} is not a token array (bytes or ndarray:<int>)")
    raw_bytes, n_samples = sh["raw_data"]["bytes"], sh["samples"]

    def load():
        if compressed:
            import zstandard
            try:
                raw = zstandard.ZstdDecompressor().decompress(Path(path).read_bytes(), max_output_size=raw_bytes)
            except zstandard.ZstdError as e:
                raise DataError(f"{path}: not a valid zstd shard ({e}): truncated or corrupt; re-copy it") from None
            buf = np.frombuffer(raw, np.uint8)
        else:
            buf = np.memmap(path, dtype=np.uint8, mode="r")
        if len(buf) != raw_bytes:
            raise DataError(f"{path}: {len(buf):,} bytes (decompressed), index.json says {raw_bytes:,}: truncated or "
                            "corrupt; re-copy the shard")
        n = int(np.frombuffer(buf, "<u4", 1)[0])
        if n != n_samples:
            raise DataError(f"{path}: holds {n} samples, index.json says {n_samples}: corrupt shard")
        offsets = np.frombuffer(buf, "<u4", n + 1, 4).astype(np.int64)
        if offsets[-1] != len(buf) or (np.diff(offsets) < 0).any():
            raise DataError(f"{path}: sample offsets run past the shard's {len(buf):,} bytes: corrupt shard")
        start = offsets[:-1] + 4 * len(var_cols)
        # Skip the columns stored before `tokens` (sorted by name) in each sample.
        col_size = {}
        for j, i in enumerate(var_cols):
            col_size[i] = _gather_u4(buf, offsets[:-1] + 4 * j)
        for i in range(ci):
            start = start + (col_size[i] if sizes[i] is None else sizes[i])
        length_bytes = col_size[ci] if sizes[ci] is None else np.full(n, sizes[ci], np.int64)
        data_start, data_end = start, start + length_bytes
        dt = dtype
        if hdr != "none":
            if hdr == "dtype+shape":
                codes = np.unique(buf[data_start])
                if len(codes) != 1 or int(codes[0]) not in MDS_DTYPE_CODES:
                    raise DataError(f"{path}: ndarray dtype codes {codes.tolist()} are not one integer type")
                dt = np.dtype(MDS_DTYPE_CODES[int(codes[0])])
                data_start = data_start + 1
            b = buf[data_start].astype(np.int64)
            ndim, code = b >> 2, b & 3
            if (ndim != 1).any() and n:
                raise DataError(f"{path}: tokens samples are not 1-D arrays")
            data_start = data_start + 1 + ndim * (1 << code)
        if ((data_end - data_start) % dt.itemsize).any() or (data_end > offsets[1:]).any():
            raise DataError(f"{path}: a sample's token bytes do not fit its record: corrupt shard")
        tokens = _gather(buf, data_start, data_end).view(dt)
        return tokens, np.cumsum((data_end - data_start) // dt.itemsize), False  # samples, not documents

    return Unit(path, [path], load, meta={"encoding": enc})


def _gather_u4(buf: np.ndarray, at: np.ndarray) -> np.ndarray:
    idx = at[:, None] + np.arange(4)
    return np.ascontiguousarray(buf[idx]).view("<u4").ravel().astype(np.int64)


def _gather(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The bytes buf[starts[i]:ends[i]] of every i, concatenated, without a Python loop per sample."""
    if len(starts) and (starts[1:] - ends[:-1] == starts[1] - ends[0]).all() and ends[-1] <= len(buf):
        gap, length = int(starts[1] - ends[0]) if len(starts) > 1 else 0, ends - starts
        if (length == length[0]).all():  # fixed-size samples (--concat_tokens): one strided view
            stride = int(length[0]) + gap
            n = len(starts)
            view = np.lib.stride_tricks.as_strided(buf[int(starts[0]):], shape=(n, int(length[0])), strides=(stride, 1))
            return np.ascontiguousarray(view).ravel()
    mark = np.zeros(len(buf) + 1, np.int8)
    np.add.at(mark, starts, 1)
    np.add.at(mark, ends, -1)
    return np.asarray(buf)[np.cumsum(mark[:-1]) > 0]


# --------------------------------------------------------------------------- token parquet / jsonl


def _tokens_units(path: str, ids_field: str) -> list[Unit]:
    if not path.endswith(".parquet"):
        return _jsonl_tokens_unit(path, ids_field)
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable parquet file ({e}): truncated or corrupt; re-copy it") from None
    if ids_field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {ids_field!r} (columns: {pf.schema_arrow.names}); set ids_field:")
    decided: dict = {}  # the file's first row group decides: rows of one length are pre-grouped

    def read_group(g: int) -> tuple[np.ndarray, np.ndarray]:
        import pyarrow as pa
        try:
            col = pq.ParquetFile(path).read_row_group(g, columns=[ids_field]).column(ids_field).combine_chunks()
        except Exception as e:
            raise DataError(f"{path}: cannot read row group {g} ({e}): truncated or corrupt; re-copy it") from None
        if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)) or \
                not pa.types.is_integer(col.type.value_type):
            raise DataError(f"{path}: column {ids_field!r} is {col.type}, not a list of token ids; "
                            "format: tokens reads list<int> columns (use format: parquet for text)")
        offs = col.offsets.to_numpy()
        return col.values.to_numpy()[offs[0]:offs[-1]], np.diff(offs).astype(np.int64)

    def unit(g: int) -> Unit:
        def load():  # one row group in memory at a time
            flat, lens = read_group(g)
            if "grouped" not in decided:
                first = lens if g == 0 else read_group(0)[1]
                decided["grouped"] = _pre_grouped(first)
            return flat, np.cumsum(lens), not decided["grouped"]
        return Unit(path if pf.num_row_groups == 1 else f"{path} (row group {g})", [path] if g == 0 else [], load,
                    nbytes=shares[g])

    # each row group's part of the file (progress): the file's size shared by the groups' compressed sizes
    md, size = pf.metadata, os.path.getsize(path)
    comp = [sum(md.row_group(g).column(c).total_compressed_size for c in range(md.num_columns))
            for g in range(pf.num_row_groups)]
    ends = [size * sum(comp[: g + 1]) // max(sum(comp), 1) for g in range(len(comp))]
    shares = [e - (ends[g - 1] if g else 0) for g, e in enumerate(ends)]
    return [unit(g) for g in range(pf.num_row_groups)]


def _pre_grouped(lens: np.ndarray) -> bool:
    """Rows of one length (more than one row) are pre-grouped blocks, not documents."""
    return len(lens) > 1 and bool((lens == lens[0]).all())


def _jsonl_tokens_unit(path: str, ids_field: str) -> list[Unit]:
    """A token jsonl in pieces of about JSONL_PIECE_BYTES, one in memory at a time: a piece is the lines
    that START in its byte range, so pieces follow from the file's size alone (no scan at plan time) and
    every line is in exactly one. Compressed files are one piece (they cannot be read from the middle).
    The file's first piece decides whether its rows are documents or pre-grouped blocks (one length)."""
    piece = int(os.environ.get("CPT_TOKENS_JSONL_PIECE", JSONL_PIECE_BYTES))
    size = os.path.getsize(path)
    whole = path.endswith((".gz", ".zst")) or size <= piece
    ranges = [(0, size)] if whole else [(a, min(a + piece, size)) for a in range(0, size, piece)]
    decided: dict = {}

    def read(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        from engine.data.sources import _loads, _open_binary
        flats, lens = [], []
        with open(path, "rb") as raw, _open_binary(path, raw) as f:
            pos = a
            if a:  # to the first line starting at or after a (a line starting before a is the last piece's)
                raw.seek(a - 1)
                pos = a - 1 + len(raw.readline())
            li = -1
            while whole or pos < b:
                line = f.readline()
                if not line:
                    break
                li += 1
                at, pos = pos, pos + len(line)
                if not line.strip():
                    continue
                try:
                    arr = np.asarray(_loads(line)[ids_field], dtype=np.int64)
                    bad = "" if arr.ndim == 1 else f"{ids_field!r} is not a flat list of ids"
                except (ValueError, KeyError, TypeError) as e:
                    bad = (f"not a JSON object with a list of ids in {ids_field!r} ({type(e).__name__}: {e}); "
                           "fix the line or set ids_field:")
                if bad:
                    raise DataError(f"{path}:{li + 1 if whole else _line_number(path, at)}: {bad}")
                flats.append(arr)
                lens.append(len(arr))
        return (np.concatenate(flats) if flats else np.zeros(0, np.int64)), np.array(lens, np.int64)

    def unit(g: int, a: int, b: int) -> Unit:
        def load():
            flat, lens = read(a, b)
            if "grouped" not in decided:
                first = lens if g == 0 else read(*ranges[0])[1]
                decided["grouped"] = _pre_grouped(first)
            return flat, np.cumsum(lens), not decided["grouped"]
        return Unit(path if whole else f"{path} (bytes {a}-{b})", [path] if g == 0 else [], load, nbytes=b - a)

    return [unit(g, a, b) for g, (a, b) in enumerate(ranges)]


def _line_number(path: str, offset: int) -> int:
    """The 1-based number of the line at byte `offset` of an uncompressed file (for an error message)."""
    n = 0
    with open(path, "rb") as f:
        while offset > 0:
            chunk = f.read(min(offset, 1 << 24))
            if not chunk:
                break
            n += chunk.count(b"\n")
            offset -= len(chunk)
    return n + 1


# --------------------------------------------------------------------------- reading


class ForeignReader:
    """The documents of a foreign source as `(meta, (flat, lens, []))` batches, like the text pipeline."""

    def __init__(self, spec: SourceSpec, name: str, tokenizer, counters, warn: Callable[[str], None] | None = None,
                 resumed: Optional[dict] = None):
        self.spec, self.name, self.counters = spec, name, counters
        self.units = units(spec)
        self.files = [u.path for u in self.units]
        self.total_bytes = sum(os.path.getsize(f) for u in self.units for f in u.files)
        self.tokenizer = tokenizer
        self.warn = warn or (lambda m: None)
        self.boundaries_known: Optional[bool] = None
        self.appended_eos = 0
        self.checked_files: set[str] = set()
        self._bytes = 0
        if resumed:  # what the committed part of an interrupted preparation found
            self.boundaries_known, self.appended_eos = resumed["boundaries_known"], resumed["eos_appended"]

    def resume_state(self) -> dict:
        return {"boundaries_known": self.boundaries_known, "eos_appended": self.appended_eos}

    # ------------------------------------------------------------- tokenizer check
    def _mismatch(self, msg: str) -> None:
        if self.spec.tokenizer_check == "warn":
            self.warn(f"{self.name}: tokenizer check (tokenizer_check: warn): {msg}")
        else:
            raise DataError(f"{msg}; prepare with the tokenizer the data was written with, or set "
                            "tokenizer_check: warn on the source to use it anyway")

    def check_header(self, tok_name: str) -> None:
        """What the files record about their tokenizer, before any token is read."""
        tok = self.tokenizer
        for u in self.units:
            rec = u.meta.get("tokenizer_name")
            if rec:
                base = lambda s: Path(s.rstrip("/")).name if Path(s.rstrip("/")).name != "tokenizer.json" \
                    else Path(s.rstrip("/")).parent.name
                if base(rec) and base(tok_name) and base(rec).lower() != base(tok_name).lower():
                    self._mismatch(f"{u.path}.metadata: written with tokenizer {rec!r}, the preset's is {tok_name!r}")
            ts = u.meta.get("token_size")
            if ts == 2 and tok.vocab_size > 65536:
                self._mismatch(f"{u.path}.metadata: token size 2 (a vocabulary of at most 65,536), the preset's "
                               f"tokenizer has {tok.vocab_size:,} ids")
            if u.meta.get("dtype") in ("uint8", "int8", "int16", "uint16"):
                cap = {"uint8": 256, "int8": 128, "int16": 32768, "uint16": 65536}[u.meta["dtype"]]
                if tok.vocab_size > cap:
                    self._mismatch(f"{u.path}.idx: dtype {u.meta['dtype']} holds ids < {cap:,}, the preset's tokenizer "
                                   f"has {tok.vocab_size:,} ids")

    def _check_range(self, u: Unit, flat: np.ndarray) -> None:
        tok = self.tokenizer
        if len(flat):
            hi, lo = int(flat.max()), int(flat.min())
            if lo < 0 or hi >= tok.vocab_size:
                self._mismatch(f"{u.path}: token ids range {lo}..{hi}, the preset's tokenizer has vocab size "
                               f"{tok.vocab_size:,} (ids 0..{tok.vocab_size - 1})")

    def _check_eos(self, u: Unit, tokens: np.ndarray, ends: Optional[np.ndarray]) -> None:
        eos = self.tokenizer.eos_id
        if u.eos_check and ends is not None and len(ends) >= 2:
            last = np.asarray(tokens[ends[ends > 0] - 1])
            vals = np.unique(last)
            if len(vals) == 1 and int(vals[0]) != eos:
                self._mismatch(f"{u.path}: every document ends with id {int(vals[0])} (its writer's EOS), the preset's "
                               f"EOS id is {eos}")

    # ------------------------------------------------------------- batches
    def bytes_read(self) -> int:
        return self._bytes

    def batches(self, after=None) -> Iterator[tuple[dict, tuple[np.ndarray, np.ndarray, list]]]:
        eos = self.tokenizer.eos_id
        batch_tokens = int(os.environ.get("CPT_FOREIGN_BATCH_TOKENS", BATCH_TOKENS))
        done_bytes = 0
        for fi, u in enumerate(self.units):
            ubytes = u.nbytes if u.nbytes is not None else sum(os.path.getsize(f) for f in u.files)
            if after is not None and fi < after[0]:
                done_bytes += ubytes
                continue
            try:
                tokens, raw_ends, known = u.load()
            except OSError as e:
                raise DataError(f"{u.path}: cannot read ({e.strerror or e}); fix or remove the file") from None
            ends, known = raw_ends, raw_ends is not None and known
            if ends is None:  # no index at all: cut every 64 Ki tokens (the unit for val_tokens / max_tokens)
                ends = np.minimum(np.arange(1, -(-len(tokens) // (1 << 16)) + 1, dtype=np.int64) << 16, len(tokens))
            if self.boundaries_known is None:
                self.boundaries_known = known
            elif self.boundaries_known != known:
                self.boundaries_known = False
            first_doc = after[1] + 1 if after is not None and fi == after[0] else 0
            eos_checked = not known
            starts = np.concatenate([[0], ends[:-1]]) if len(ends) else ends
            d = first_doc
            while d < len(ends):
                # Documents d..e-1: up to BATCH_TOKENS tokens (at least one document).
                e = int(np.searchsorted(ends, starts[d] + batch_tokens, side="right"))
                e = max(e, d + 1)
                a, b = int(starts[d]), int(ends[e - 1])
                flat = np.asarray(tokens[a:b])
                self._check_range(u, flat)  # ids first: a smaller vocabulary is the clearer message
                if not eos_checked:
                    self._check_eos(u, tokens, raw_ends)
                    eos_checked = True
                lens = (ends[d:e] - starts[d:e]).astype(np.int64)
                if known:
                    flat, lens = self._eos(flat, lens, eos)
                self.counters.docs += int((lens > 0).sum())
                self._bytes = done_bytes + int(ubytes * b / max(len(tokens), 1))
                meta = {"position": (fi, e - 1), "counters": self.counters.snapshot(), "bytes": self._bytes}
                yield meta, (flat, lens, [])
                d = e
            done_bytes += ubytes
            self._bytes = done_bytes

    def _eos(self, flat: np.ndarray, lens: np.ndarray, eos: int) -> tuple[np.ndarray, np.ndarray]:
        """Append EOS to the documents that do not end with it (never a second one)."""
        ends = np.cumsum(lens)
        nonempty = lens > 0
        missing = np.zeros(len(lens), bool)
        missing[nonempty] = flat[ends[nonempty] - 1] != eos
        if not missing.any():
            return flat, lens
        self.appended_eos += int(missing.sum())
        out = np.insert(flat.astype(np.int64, copy=False), ends[missing], eos)
        return out, lens + missing


def data_notes(preset, mix, stage, long_docs: Optional[dict] = None) -> list[str]:
    """Lines for `cpt-tui plan`: what a stage's foreign / sampled sources and long_docs mean (no data read)."""
    out = []
    for name in mix.weights:
        spec = preset.sources[name]
        if spec.format == "mds":
            out.append(f"{name}: MDS samples are read as written (no re-tokenization, no EOS added); document "
                       "boundaries are unknown (packed samples): val_tokens / max_tokens cut whole samples")
        elif spec.format == "tokens":
            out.append(f"{name}: token ids read as written; rows of one fixed length are taken as pre-grouped "
                       "(document boundaries unknown), other rows as documents (EOS appended where missing)")
        elif spec.format in ("datatrove", "megatron"):
            out.append(f"{name}: {spec.format} tokens read as written (no re-tokenization); documents from its index")
        if spec.sample == "shuffled":
            out.append(f"{name}: max_tokens={spec.max_tokens:,} drawn as a random subset of documents "
                       f"(sample: shuffled, seed {spec.sample_seed})")
    if stage.long_docs:
        ld = stage.long_docs
        out.append(f"long_docs: within each source, documents >= {ld.min_tokens:,} tokens make up {ld.share:.0%} of "
                   "its tokens (weights unchanged)" + ("" if long_docs else "; shares available / realised per "
                                                       "source: reported by preparation (prepared.json long_docs)"))
        for name, r in (long_docs or {}).items():
            out.append(f"{name}: long-document share {r['available_share']:.1%} available -> "
                       f"{r['realised_share']:.1%} realised (long documents x{r['long_repeats']:.2f}, "
                       f"short x{r['short_rate']:.2f} per pass)")
            reps = r["long_repeats"]
            if reps > mix.max_repeats:
                out.append(f"{name}: warning: long documents repeat {reps:.1f} times per pass (more than "
                           f"max_repeats={mix.max_repeats:g}); lower share or add long documents")
        for name in mix.weights:
            if preset.sources[name].format == "mds":
                out.append(f"{name}: long_docs needs document boundaries, which MDS samples do not keep: "
                           "preparation will fail for this stage")
    return out
