"""Tokenize a source and pack it: one flat token stream per split (documents + EOS), in shards.

A source is prepared once into its directory (see engine.data.shards for the shard files):
  train-NNNNN.bin, val-NNNNN.bin   fixed-size shards of the two splits (uint16 or uint32)
  train-docs.idx                   optional: start offset (uint64) of every training document
  progress.json                    the last commit: reader position, split lengths, counters
  manifest.json                    written last, atomically: only then is the source complete.
The stream is independent of the sequence length: a stage cuts it into blocks of its own
`seq_len` (context extension reuses the same shards).

Resumable: every couple of seconds the data is fsynced and a progress record is committed.
A killed preparation restarts from the last commit (files truncated to the committed lengths,
reader positioned after the last committed document) and produces the same bytes as an
uninterrupted one, because the token stream is a pure function of the documents in order.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from engine.data.foreign import ForeignReader, is_foreign
from engine.data.shards import ShardWriter, TokenStream
from engine.data.sources import Counters, DataError, Position, SourceReader, source_files
from engine.data.tokenize import EncodePool, default_workers, share_backend
from engine.faults import prep_kill_after
from engine.spec import SourceSpec

FORMAT_VERSION = 2
SHARD_TOKENS = 1 << 27  # 256 MB of uint16 per shard
BATCH_CHARS, BATCH_DOCS = 1 << 20, 4096  # texts sent to a worker at once
COMMIT_EVERY_S = float(os.environ.get("CPT_PREP_COMMIT_S", 2.0))  # seconds between progress records


def shard_tokens() -> int:
    return int(os.environ.get("CPT_SHARD_TOKENS", SHARD_TOKENS))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> str:
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        p = Path(tokenizer_dir) / name
        if p.exists():
            h.update(name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def spec_fingerprint(spec: SourceSpec) -> str:
    """Content key of a source without the tokenizer: the spec fields that change the tokens, its files."""
    d = spec.model_dump(mode="json", exclude={"domain", "on_error", "tokenizer_check"})  # labels and policy
    # Defaults of fields added later are left out: the keys of sources that do not use them stay as they were.
    for k, default in (("sample_by", "document"), ("ids_field", "input_ids"), ("sample", "first"), ("sample_seed", 0)):
        if d.get(k) == default:
            del d[k]
    h = hashlib.sha256(json.dumps(d, sort_keys=True).encode())
    h.update(f"{FORMAT_VERSION}|{shard_tokens()}".encode())
    for f in source_files(spec):
        if os.path.exists(f):
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{int(st.st_mtime)}".encode())
        else:
            h.update(f.encode())
    return h.hexdigest()[:16]


def source_fingerprint(spec: SourceSpec, tok_fp: str) -> str:
    """Content key of a prepared source: its spec, its files (path, size, mtime), the tokenizer."""
    return hashlib.sha256(f"{spec_fingerprint(spec)}|{tok_fp}".encode()).hexdigest()[:16]


def prepared_dir(cache: str | Path, name: str, spec: SourceSpec, tok_fp: str) -> Path:
    """Where a source is prepared: keyed by content, so a changed input never reuses stale shards."""
    return Path(cache) / "prepared" / f"{name}-{source_fingerprint(spec, tok_fp)}"


class Tokenizer:
    """The fast tokenizer's Rust backend plus the BOS/EOS conventions of the HF tokenizer.

    Loading it through transformers imports transformers and torch (~2-4 s here, more than tokenizing
    100 MB takes): for a local directory with a tokenizer.json, what preparation needs from it (the
    backend's JSON, eos/bos ids, whether it prepends BOS, its length) is kept in ~/.cache/cpt-tui per
    content of the directory's files and transformers/tokenizers versions, and later loads build the
    backend from that JSON with `tokenizers` alone (as the worker processes always did), on first use
    (`backend`): preparation's tiktoken path does without it."""

    def __init__(self, tokenizer_dir: str | Path, add_bos: bool | None = None):
        facts = _tokenizer_facts(tokenizer_dir)
        self._encoder_args = None
        if isinstance(facts[0], str):  # from the cache: no transformers; the backend is built on first use
            self._backend, self._backend_json = None, facts[0]
        else:
            self._backend, self._backend_json = facts[0], None
        f = facts[1]
        self.name_or_path = str(tokenizer_dir)
        self.eos_id = f["eos_token_id"]
        if self.eos_id is None:
            raise DataError(f"{tokenizer_dir}: the tokenizer has no eos_token; set one in tokenizer_config.json")
        self.bos_id = f["bos_token_id"] if (add_bos if add_bos is not None else f["adds_bos"]) else None
        self.vocab_size = f["len"]
        self.dtype = token_dtype(max(self.vocab_size, f["ids"]))

    @property
    def backend(self):
        """The Rust tokenizer (built from the cached JSON on first use: preparation's tiktoken path needs none)."""
        if self._backend is None:
            from tokenizers import Tokenizer as RustTokenizer
            self._backend = RustTokenizer.from_str(self._backend_json)
        return self._backend

    def fingerprint(self, tokenizer_dir: str | Path) -> str:
        base = tokenizer_fingerprint(tokenizer_dir) if Path(tokenizer_dir).exists() else str(tokenizer_dir)
        return f"{base}|bos={self.bos_id}|eos={self.eos_id}|{self.dtype.name}"

    def encoder_args(self) -> tuple:
        # kept: the same string each time, so the tiktoken path built for it is found again (tokenize._fast_setup)
        if self._encoder_args is None:
            js = self._backend_json if self._backend_json is not None else self.backend.to_str()
            self._encoder_args = (js, self.bos_id, self.eos_id, self.dtype.name)
            if self._backend is not None:
                share_backend(js, self._backend)  # in-process encoders use this one
        return self._encoder_args

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encs = self.backend.encode_batch(texts, add_special_tokens=False)
        pre = [self.bos_id] if self.bos_id is not None else []
        return [pre + e.ids + [self.eos_id] for e in encs]


TOKENIZER_CACHE_VERSION = 2
_BIG_FILE = 64 << 20  # files above this size (model weights) enter the cache key by name, size and mtime


def _tokenizer_key(tokenizer_dir: Path) -> Optional[str]:
    """The content key of what AutoTokenizer reads from a local directory, or None (no cache)."""
    if not (tokenizer_dir / "tokenizer.json").is_file():
        return None
    try:
        from importlib.metadata import version
        h = hashlib.sha256(f"{TOKENIZER_CACHE_VERSION}|{version('transformers')}|{version('tokenizers')}".encode())
        for p in sorted(tokenizer_dir.iterdir()):
            if not p.is_file():
                continue
            st = p.stat()
            h.update(f"|{p.name}|{st.st_size}|".encode())
            h.update(p.read_bytes() if st.st_size <= _BIG_FILE else str(st.st_mtime_ns).encode())
        return h.hexdigest()[:24]
    except Exception:  # unreadable file, no package metadata: load through transformers
        return None


def _tokenizer_facts(tokenizer_dir: str | Path) -> tuple:
    """(backend JSON from the cache or the backend itself, {eos_token_id, bos_token_id, adds_bos, len, ids})."""
    from engine.data.tiktoken_bpe import cache_dir

    d = Path(tokenizer_dir)
    key = _tokenizer_key(d) if d.is_dir() else None
    cache = cache_dir() / "tokenizers"
    if key is not None:
        try:
            facts = json.loads((cache / f"{key}.json").read_text())
            js = (cache / f"{key}.tokenizer.json").read_text()
            if facts.pop("sha256") == hashlib.sha256(js.encode()).hexdigest():
                return js, facts
        except (OSError, ValueError, KeyError):
            pass
    from transformers import AutoTokenizer  # imported here: only preparation needs it

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if not hf.is_fast:
        raise DataError(f"{tokenizer_dir}: not a fast tokenizer; preparation needs tokenizer.json")
    facts = {"eos_token_id": hf.eos_token_id, "bos_token_id": hf.bos_token_id, "adds_bos": _adds_bos(hf), "len": len(hf),
             "ids": hf.backend_tokenizer.get_vocab_size(with_added_tokens=True)}
    if key is not None:
        try:  # best effort: without it the next load goes through transformers again
            js = hf.backend_tokenizer.to_str()
            cache.mkdir(parents=True, exist_ok=True)
            for name, text in ((f"{key}.tokenizer.json", js),
                               (f"{key}.json", json.dumps({**facts, "sha256": hashlib.sha256(js.encode()).hexdigest()}))):
                tmp = cache / f"{name}.{os.getpid()}.tmp"
                tmp.write_text(text)
                os.replace(tmp, cache / name)
        except OSError:
            pass
    return hf.backend_tokenizer, facts


def _adds_bos(hf) -> bool:
    # Llama-style tokenizers prepend BOS when encoding; GPT-2 style ones do not.
    ids = hf("a").input_ids
    return bool(ids) and hf.bos_token_id is not None and ids[0] == hf.bos_token_id


def write_json_atomic(path: str | Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (the directory entry itself is fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- routing


class _Router:
    """Sends each encoded document to val or train (or drops it), per val_tokens / val_fraction / max_tokens.

    Validation is taken first (whole documents, the last one cut at val_tokens and its remainder
    dropped: a document is never split between val and train), or every n-th document with
    val_fraction. Training stops at max_tokens (the last document cut).
    """

    def __init__(self, spec: SourceSpec, state: dict):
        self.every = round(1 / spec.val_fraction) if spec.val_fraction else 0
        self.doc_i, self.val_left, self.train_left = state["doc_i"], state["val_left"], state["train_left"]
        self.val_docs, self.train_docs = state["val_docs"], state["train_docs"]
        # Documents the tokenizer rejected (counted here: the reader's counters cannot know).
        self.unencodable, self.unencodable_at = state["unencodable"], state["unencodable_at"]

    def state(self) -> dict:
        return {"doc_i": self.doc_i, "val_left": self.val_left, "train_left": self.train_left,
                "val_docs": self.val_docs, "train_docs": self.train_docs,
                "unencodable": self.unencodable, "unencodable_at": self.unencodable_at}

    @property
    def full(self) -> bool:
        return self.train_left is not None and self.train_left <= 0

    def route(self, flat: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(val tokens, train tokens, train document start offsets within the train tokens)."""
        n = len(lens)
        valid = lens > 0
        ends = np.cumsum(lens)
        starts = ends - lens
        val_take = np.zeros(n, dtype=np.int64)
        if self.every:
            k = self.doc_i + np.cumsum(valid)
            val_take = np.where(valid & (k % self.every == 0), lens, 0)
        elif self.val_left > 0:
            for i in np.flatnonzero(valid):
                if self.val_left <= 0:
                    break
                val_take[i] = min(int(lens[i]), self.val_left)
                self.val_left -= int(val_take[i])
        self.doc_i += int(valid.sum())
        is_val = val_take > 0
        is_train = valid & ~is_val
        self.val_docs += int(is_val.sum())
        if not is_val.any():
            val = flat[:0]
            train = flat if is_train.all() else flat[np.repeat(is_train, lens)]
        elif not self.every and not (valid & ~is_val)[:int(np.flatnonzero(is_val)[-1])].any():
            # val_tokens: the validation documents are a prefix of the batch (the last maybe cut), so both
            # splits are plain slices (no per-token mask over a large batch of already-tokenized data).
            k = int(np.flatnonzero(is_val)[-1])
            val = flat[:int(starts[k]) + int(val_take[k])]
            train = flat[int(ends[k]):]
        else:
            doc_of = np.repeat(np.arange(n), lens)
            pos = np.arange(len(flat)) - starts[doc_of]
            val = flat[pos < val_take[doc_of]]
            train = flat[is_train[doc_of]]
        tlens = lens[is_train]
        tstarts = np.cumsum(tlens) - tlens
        if self.train_left is not None:
            train = train[: self.train_left]
            tstarts = tstarts[tstarts < len(train)]
            self.train_left -= len(train)
        self.train_docs += len(tstarts)
        return val, train, tstarts


def _batches(reader: SourceReader, after: Optional[Position]) -> Iterator[tuple[dict, list[str]]]:
    """Batches of texts, each with the reader state after its last document (for the progress record)."""
    texts: list[str] = []
    chars = 0
    pos = after
    for pos, text in reader.documents(after):
        texts.append(text)
        chars += len(text)
        reader.counters.docs += 1
        if chars >= BATCH_CHARS or len(texts) >= BATCH_DOCS:
            yield {"position": pos, "counters": reader.counters.snapshot(), "bytes": reader.bytes_read()}, texts
            texts, chars = [], 0
    if texts:
        yield {"position": pos, "counters": reader.counters.snapshot(), "bytes": reader.bytes_read()}, texts


# --------------------------------------------------------------------------- one source


def _fresh_state(spec: SourceSpec) -> dict:
    return {"position": None, "counters": Counters().snapshot(), "bytes": 0, "train_tokens": 0, "val_tokens": 0,
            "boundaries": 0, "doc_i": 0, "val_left": spec.val_tokens, "train_left": spec.max_tokens,
            "val_docs": 0, "train_docs": 0, "unencodable": 0, "unencodable_at": None}


def _load_progress(out: Path, fp: str, spec: SourceSpec) -> dict:
    try:
        rec = json.loads((out / "progress.json").read_text())
        if rec.get("fingerprint") == fp and rec.get("format_version") == FORMAT_VERSION:
            return rec["state"]
    except (OSError, ValueError, KeyError):
        pass
    for p in list(out.glob("*.bin")) + list(out.glob("*.idx")) + list(out.glob("*.tmp")):
        p.unlink()  # leftovers of another input or format: start over
    (out / "progress.json").unlink(missing_ok=True)
    return _fresh_state(spec)


class _Boundaries:
    """Append-only uint64 start offsets of training documents (for intra-document attention masks)."""

    def __init__(self, path: Path, committed: int):
        self.path, self.n = path, committed
        with open(path, "ab") as f:
            f.truncate(committed * 8)
        self._f = open(path, "ab")

    def write(self, offsets: np.ndarray) -> None:
        self._f.write(offsets.astype(np.uint64).tobytes())
        self.n += len(offsets)

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self.sync()
        self._f.close()


def prepare_source(
    spec: SourceSpec,
    name: str,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    tok_fp: str,
    progress: Callable[[dict], None] | None = None,
    pool: EncodePool | None = None,
) -> dict:
    """Prepare one source into `out_dir` (nothing to do if its manifest matches); returns the manifest."""
    out = Path(out_dir)
    fp = source_fingerprint(spec, tok_fp)
    man = _complete(out, fp)
    if man:
        return man
    if spec.sample == "shuffled":  # the whole source once (cached), then a seeded subset of its documents
        from engine.data.sample import prepare_shuffled
        return prepare_shuffled(spec, name, tokenizer, out, fp, tok_fp, progress, pool)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process preparing the same source: wait for it
        man = _complete(out, fp)
        if man:
            return man
        (out / "manifest.json").unlink(missing_ok=True)
        try:
            return _prepare_locked(spec, name, tokenizer, out, fp, tok_fp, progress, pool)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DataError(f"{out}: no space left on the device while preparing source {name!r}; the shards "
                                "committed so far are kept (not marked complete): free space and rerun to continue") from None
            raise


def _complete(out: Path, fp: str) -> Optional[dict]:
    try:
        man = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return man if man.get("fingerprint") == fp and man.get("format_version") == FORMAT_VERSION else None


def _prepare_locked(spec, name, tokenizer, out, fp, tok_fp, progress, pool) -> dict:
    state = _load_progress(out, fp, spec)
    S, dtype = shard_tokens(), tokenizer.dtype
    warnings: list[str] = []
    if is_foreign(spec):  # already tokenized: memory-mapped batches, no encoding (engine.data.foreign)
        reader = ForeignReader(spec, name, tokenizer, Counters.restore(state["counters"]), warn=warnings.append,
                               resumed=state.get("foreign"))
        reader.check_header(tokenizer.name_or_path)
        own_pool = False
        batches = reader.batches(state["position"])
    else:
        reader = SourceReader(spec, name, Counters.restore(state["counters"]))
        own_pool = pool is None or (pool.workers > 1 and default_workers(reader.total_bytes) == 1)
        if own_pool:  # small sources are encoded in-process: a pool costs more than it saves
            pool = EncodePool(tokenizer.encoder_args(), default_workers(reader.total_bytes))
        batches = pool.map(_batches(reader, state["position"]))
    train = ShardWriter(out, "train", S, dtype, state["train_tokens"])
    val = ShardWriter(out, "val", S, dtype, state["val_tokens"])
    bounds = _Boundaries(out / "train-docs.idx", state["boundaries"]) if spec.keep_boundaries else None
    router = _Router(spec, state)
    t0 = t_commit = t_report = time.time()
    start_bytes, start_tokens = state["bytes"], state["train_tokens"] + state["val_tokens"]
    fsync_dir(out)

    kill_after = prep_kill_after()  # engine/faults.py

    def commit(meta: dict) -> None:
        if pool is not None:  # the sampled cross-checks of what is written so far have passed
            pool.settle()
        for w in (train, val, bounds):
            if w is not None:
                w.sync()
        st = {**router.state(), "position": meta["position"], "counters": meta["counters"], "bytes": meta["bytes"],
              "train_tokens": train.tokens, "val_tokens": val.tokens, "boundaries": bounds.n if bounds else 0}
        if is_foreign(spec):
            st["foreign"] = reader.resume_state()
        write_json_atomic(out / "progress.json", {"format_version": FORMAT_VERSION, "fingerprint": fp, "state": st})
        state.update(st)
        if kill_after is not None and train.tokens >= kill_after:  # fault injection for the resume test only
            os.kill(os.getpid(), signal.SIGKILL)

    try:
        meta = None
        if not router.full:
            for meta, (flat, lens, bad) in batches:
                if bad:
                    if spec.on_error == "fail":
                        raise DataError(f"source {name!r}: a document before record {meta['position']} cannot be "
                                        "encoded (invalid Unicode, e.g. a lone surrogate); fix it or set on_error: skip")
                    router.unencodable += len(bad)
                    router.unencodable_at = router.unencodable_at or f"{reader.files[meta['position'][0]]} before record {meta['position'][1]}"
                vtoks, ttoks, tstarts = router.route(flat, lens)
                if bounds is not None:
                    bounds.write(tstarts + train.tokens)
                val.write(vtoks)
                train.write(ttoks)
                now = time.time()
                if now - t_commit >= COMMIT_EVERY_S:
                    commit(meta)
                    t_commit = now
                if progress and now - t_report >= 0.5:
                    t_report = now
                    progress({"source": name, "bytes": meta["bytes"], "total_bytes": reader.total_bytes,
                              "documents": meta["counters"]["docs"], "tokens": train.tokens + val.tokens,
                              "elapsed": now - t0, "bytes_this_run": meta["bytes"] - start_bytes,
                              "tokens_this_run": train.tokens + val.tokens - start_tokens})
                if router.full:
                    break
            else:  # the reader is exhausted: its counters include records skipped after the last document
                meta = {"position": meta["position"] if meta else state["position"],
                        "counters": reader.counters.snapshot(), "bytes": reader.bytes_read()}
        if meta is not None:
            commit(meta)
    finally:
        if own_pool:
            pool.close()
        for w in (train, val, bounds):
            if w is not None:
                w.close()
    counters = Counters.restore(state["counters"])
    if state["unencodable"]:
        counters.docs -= state["unencodable"]
        counters.skipped["unencodable text"] = state["unencodable"]
        counters.first_error["unencodable text"] = state["unencodable_at"]
    if train.tokens == 0:
        why = "; ".join(f"{n} {r} (first at {counters.first_error[r]})" for r, n in counters.skipped.items())
        raise DataError(f"source {name!r} ({spec.path}): no training tokens — "
                        + (f"every record was skipped: {why}" if why else
                           "the source is empty, or val_tokens takes all of it") + "; fix the data or the source")
    man = {
        "format_version": FORMAT_VERSION,
        "source": name,
        "fingerprint": fp,
        "spec_fingerprint": spec_fingerprint(spec),
        "tokenizer_fingerprint": tok_fp,
        "dtype": dtype.name,
        "eos_id": tokenizer.eos_id,
        "bos_id": tokenizer.bos_id,
        "vocab_size": tokenizer.vocab_size,
        "shard_tokens": S,
        "train": {"tokens": train.tokens, "documents": state["train_docs"], "shards": train.shards()},
        "val": {"tokens": val.tokens, "documents": state["val_docs"], "shards": val.shards()},
        "boundaries": {"file": "train-docs.idx", "documents": bounds.n} if bounds else None,
        "documents": counters.docs,
        "skipped": counters.skipped,
        "first_skipped": counters.first_error,
        "input": {"files": len(reader.files), "bytes": reader.total_bytes},
    }
    if is_foreign(spec):
        man["foreign"] = {"format": spec.format, "boundaries_known": bool(reader.boundaries_known),
                          "eos_appended": reader.appended_eos, "warnings": warnings}
    write_json_atomic(out / "manifest.json", man)
    (out / "progress.json").unlink(missing_ok=True)
    fsync_dir(out)
    return man


# --------------------------------------------------------------------------- reading


def open_tokens(source_dir: str | Path, split: str = "train") -> TokenStream | np.ndarray:
    """The tokens of a prepared split as one sliceable sequence (memory-mapped shards)."""
    man = json.loads((Path(source_dir) / "manifest.json").read_text())
    sp = man[split]
    if "view" in sp:  # long-document upsampling: segments of another prepared stream (engine.data.longdocs)
        from engine.data.longdocs import SegmentStream
        return SegmentStream(Path(source_dir), sp)
    if "shards" not in sp:  # format 1: one file per split
        if sp["tokens"] == 0:
            return np.zeros(0, dtype=man["dtype"])
        return np.memmap(Path(source_dir) / sp["file"], dtype=man["dtype"], mode="r")
    return TokenStream(source_dir, sp["shards"], man["dtype"])


def open_boundaries(source_dir: str | Path) -> Optional[np.ndarray]:
    """Start offsets of the training documents, if the source kept them (keep_boundaries: true)."""
    man = json.loads((Path(source_dir) / "manifest.json").read_text())
    b = man.get("boundaries")
    if not b or not b["documents"]:
        return None
    return np.memmap(Path(source_dir) / b["file"], dtype=np.uint64, mode="r")

