"""Tokenize a source and pack it: one flat token stream per split (documents + EOS), memory-mapped.

A source is prepared once into `<dir>/train.bin`, `<dir>/val.bin` and `<dir>/manifest.json`.
The stream is independent of the sequence length: a stage cuts it into blocks of its own
`seq_len` (context extension reuses the same shards). The manifest is written last, atomically:
a directory without one is never taken for complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from engine.data.sources import Counters, DataError, read_documents, source_files
from engine.spec import SourceSpec

FORMAT_VERSION = 1
BATCH_DOCS = 512


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> str:
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        p = Path(tokenizer_dir) / name
        if p.exists():
            h.update(name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def source_fingerprint(spec: SourceSpec, tok_fp: str) -> str:
    """Content key of a prepared source: its spec, its files (path, size, mtime), the tokenizer."""
    h = hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode())
    h.update(tok_fp.encode())
    h.update(str(FORMAT_VERSION).encode())
    for f in source_files(spec):
        if os.path.exists(f):
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{int(st.st_mtime)}".encode())
        else:
            h.update(f.encode())
    return h.hexdigest()[:16]


class Tokenizer:
    """The fast tokenizer's Rust backend plus the BOS/EOS conventions of the HF tokenizer."""

    def __init__(self, tokenizer_dir: str | Path, add_bos: bool | None = None):
        from transformers import AutoTokenizer  # imported here: only preparation needs it

        hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        if not hf.is_fast:
            raise DataError(f"{tokenizer_dir}: not a fast tokenizer; preparation needs tokenizer.json")
        self.backend = hf.backend_tokenizer
        self.eos_id = hf.eos_token_id
        if self.eos_id is None:
            raise DataError(f"{tokenizer_dir}: the tokenizer has no eos_token; set one in tokenizer_config.json")
        self.bos_id = hf.bos_token_id if (add_bos if add_bos is not None else _adds_bos(hf)) else None
        self.vocab_size = len(hf)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encs = self.backend.encode_batch(texts, add_special_tokens=False)
        pre = [self.bos_id] if self.bos_id is not None else []
        return [pre + e.ids + [self.eos_id] for e in encs]


def _adds_bos(hf) -> bool:
    # Llama-style tokenizers prepend BOS when encoding; GPT-2 style ones do not.
    ids = hf("a").input_ids
    return bool(ids) and hf.bos_token_id is not None and ids[0] == hf.bos_token_id


def _batches(docs: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for d in docs:
        batch.append(d)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def prepare_source(
    spec: SourceSpec,
    name: str,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    tok_fp: str,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Prepare one source into `out_dir` (skipped if its manifest matches); returns the manifest."""
    out = Path(out_dir)
    fp = source_fingerprint(spec, tok_fp)
    man_path = out / "manifest.json"
    if man_path.exists():
        man = json.loads(man_path.read_text())
        if man.get("fingerprint") == fp and man.get("format_version") == FORMAT_VERSION:
            return man
    out.mkdir(parents=True, exist_ok=True)
    man_path.unlink(missing_ok=True)  # from here on the directory is incomplete
    dtype = token_dtype(tokenizer.vocab_size)
    counters = Counters()
    val_left, train_left = spec.val_tokens, spec.max_tokens
    n_val = n_train = 0
    every = round(1 / spec.val_fraction) if spec.val_fraction else 0  # val_fraction: every n-th document
    doc_i = 0
    t0 = time.time()
    with open(out / "val.bin.tmp", "wb") as fval, open(out / "train.bin.tmp", "wb") as ftrain:
        for batch in _batches(read_documents(spec, name, counters), BATCH_DOCS):
            counters.docs += len(batch)
            for ids in tokenizer.encode_batch(batch):
                arr = np.asarray(ids, dtype=dtype)
                doc_i += 1
                if every and doc_i % every == 0:
                    fval.write(arr.tobytes())
                    n_val += len(arr)
                    continue
                if val_left > 0:  # validation comes first: it is never part of the training stream
                    take = arr[:val_left]
                    fval.write(take.tobytes())
                    n_val += len(take)
                    val_left -= len(take)
                    arr = arr[len(take):]
                if train_left is not None:
                    arr = arr[:train_left]
                    train_left -= len(arr)
                ftrain.write(arr.tobytes())
                n_train += len(arr)
            if progress:
                progress({"source": name, "docs": counters.docs, "tokens": n_train + n_val, "elapsed": time.time() - t0})
            if train_left is not None and train_left <= 0:
                break
        for f in (fval, ftrain):
            f.flush()
            os.fsync(f.fileno())
    if n_train == 0:
        raise DataError(f"source {name!r} ({spec.path}): no training tokens (empty source, or val_tokens takes everything)")
    os.replace(out / "val.bin.tmp", out / "val.bin")
    os.replace(out / "train.bin.tmp", out / "train.bin")
    man = {
        "format_version": FORMAT_VERSION,
        "source": name,
        "fingerprint": fp,
        "tokenizer_fingerprint": tok_fp,
        "dtype": dtype.name,
        "eos_id": tokenizer.eos_id,
        "bos_id": tokenizer.bos_id,
        "vocab_size": tokenizer.vocab_size,
        "train": {"file": "train.bin", "tokens": n_train},
        "val": {"file": "val.bin", "tokens": n_val},
        "documents": counters.docs,
        "skipped": counters.skipped,
        "first_skipped": counters.first_error,
    }
    write_json_atomic(man_path, man)
    return man


def write_json_atomic(path: str | Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_tokens(source_dir: str | Path, split: str = "train") -> np.ndarray:
    man = json.loads((Path(source_dir) / "manifest.json").read_text())
    path = Path(source_dir) / man[split]["file"]
    if man[split]["tokens"] == 0:
        return np.zeros(0, dtype=man["dtype"])
    return np.memmap(path, dtype=man["dtype"], mode="r")
