"""Batch tokenization: texts → one flat token array (BOS/EOS added) + lengths.

For byte-level BPE tokenizers whose vocabulary is rank-consistent (GPT-2, Llama 3, Qwen 2/3,
HF-trained) documents are encoded by tiktoken with ranks derived from the tokenizer itself
(engine.data.tiktoken_bpe: derived and checked once here, in the parent; CPT_PREP_FAST=0 turns it
off), in threads of this process: tiktoken releases the GIL while it encodes and hands back a
buffer, not Python ints. Every other tokenizer, the documents that path does not take, and small
inputs (encoded in-process) use the Rust tokenizer; for large inputs in one worker process per core
(workers import only numpy and `tokenizers`, so they start fast). Results come back in submission
order with a bounded number of batches in flight, so memory does not grow with the corpus. A
batch's output depends only on its texts: the token stream is identical whatever the number of
workers or threads or the batch boundaries, and with the fast path on or off.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Optional

import numpy as np


VERIFY_EVERY = 64  # the fast path's sampled cross-check against the Rust tokenizer (see Encoder._verify)


class Encoder:
    """Thread-safe: the tiktoken path and the Rust tokenizer are both immutable once built."""

    def __init__(self, tokenizer_json: str, bos_id: Optional[int], eos_id: int, dtype: str, fast=False):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(tokenizer_json)
        self.bos_id, self.eos_id, self.dtype = bos_id, eos_id, np.dtype(dtype)
        self._bos = np.array([bos_id if bos_id is not None else 0], dtype=np.uint32)
        self._eos = np.array([eos_id], dtype=np.uint32)
        # fast: False (Rust only), True (run the start-up check, its verdict cached), or the characters
        # the caller's check (fast_path_ok) excluded: the path is exact here for the others
        self.fast = None
        self._seen = itertools.count()  # documents taken by the fast path (for the sampled check; atomic)
        if fast is not False and fast is not None:
            from engine.data.tiktoken_bpe import TiktokenBPE
            self.fast = TiktokenBPE.build(self.tok, tokenizer_json, check=fast)[0]

    def _ids(self, texts: list[str]) -> tuple[list, list[int]]:
        if self.fast is None:
            return self._rust_ids(texts)
        f = self.fast.ids
        ids = [f(t) for t in texts]
        self._verify(texts, ids)
        rest = [i for i, x in enumerate(ids) if x is None]
        if not rest:
            return ids, []
        rids, rbad = self._rust_ids([texts[i] for i in rest])
        for i, x in zip(rest, rids):
            ids[i] = x
        return ids, [rest[j] for j in rbad]

    def _verify(self, texts: list[str], ids: list) -> None:
        """Every VERIFY_EVERY-th document of the fast path is encoded by the Rust tokenizer too: a
        disagreement the start-up checks missed stops the preparation (no source is marked complete)
        instead of training on wrong ids."""
        for i, x in enumerate(ids):
            if x is None or next(self._seen) % VERIFY_EVERY:
                continue
            # encode_batch_fast releases the GIL (encode does not: it would stall the other threads)
            ref = self.tok.encode_batch_fast([texts[i]], add_special_tokens=False)[0].ids
            if len(ref) != len(x) or not np.array_equal(np.asarray(ref, dtype=np.uint32), x):
                from engine.data.sources import DataError
                from engine.data.tiktoken_bpe import SWITCH

                raise DataError(f"the tiktoken tokenization path (engine/data/tiktoken_bpe.py) disagrees with the "
                                f"tokenizer on a document starting {texts[i][:60]!r}; rerun with {SWITCH} "
                                "(the Rust tokenizer only) and please report it")

    def _rust_ids(self, texts: list[str]) -> tuple[list[list[int]], list[int]]:
        try:
            return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)], []
        except Exception:  # e.g. lone surrogates from a JSON escape: find the bad documents one by one
            ids, bad = [], []
            for i, t in enumerate(texts):
                try:
                    ids.append(self.tok.encode(t, add_special_tokens=False).ids)
                except Exception:
                    ids.append([])
                    bad.append(i)
            return ids, bad

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(tokens of all documents, each followed by EOS and preceded by BOS if used; lengths; bad indices)."""
        ids, bad = self._ids(texts)
        extra = 1 + (self.bos_id is not None)
        lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + extra
        if bad:
            lens[bad] = 0  # an unencodable document contributes nothing (the caller counts it)
        parts = []
        badset = set(bad)
        for i, x in enumerate(ids):
            if i in badset:
                continue
            if self.bos_id is not None:
                parts.append(self._bos)
            parts.append(x if isinstance(x, np.ndarray) else np.array(x, dtype=np.uint32))
            parts.append(self._eos)
        if not parts:
            return np.empty(0, dtype=self.dtype), lens, bad
        return np.concatenate(parts).astype(self.dtype, copy=False), lens, bad


_ENCODER: Optional[Encoder] = None


def fast_path_ok(encoder_args: tuple) -> tuple[bool, str, tuple]:
    """(is the exact tiktoken path usable for this tokenizer, why not, the characters the start-up
    check excluded). CPT_PREP_FAST=0: never."""
    if os.environ.get("CPT_PREP_FAST", "1") == "0":
        return False, "CPT_PREP_FAST=0", ()
    from tokenizers import Tokenizer

    from engine.data.tiktoken_bpe import TiktokenBPE
    fast, why = TiktokenBPE.build(Tokenizer.from_str(encoder_args[0]), encoder_args[0])
    return fast is not None, why, tuple(sorted(fast.excluded)) if fast is not None else ()


def _init(args: tuple) -> None:
    global _ENCODER
    try:  # die with the parent (kill -9 of a preparation must not leave workers behind)
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the pool is the parallelism
    _ENCODER = Encoder(*args)


def _encode(texts: list[str]):
    return _ENCODER(texts)


def default_workers(total_bytes: int) -> int:
    """Worker processes: one per core, but none for small inputs (starting a pool costs ~1 s)."""
    env = os.environ.get("CPT_PREP_WORKERS")
    if env:
        return max(1, int(env))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if total_bytes < 8 << 20 else cores


class EncodePool:
    """Ordered, bounded parallel map of Encoder over batches; `workers <= 1` encodes in-process (Rust).

    With the tiktoken path the parallelism is `workers` threads of this process (CPT_PREP_POOL=process:
    worker processes instead, for comparison); otherwise one worker process per core."""

    def __init__(self, encoder_args: tuple, workers: int):
        self.workers = workers
        self.pool = self.threads = self.encoder = None
        self.fast, self.fast_why = False, "small input: encoded in-process by the Rust tokenizer"
        if workers <= 1:
            self.encoder = Encoder(*encoder_args)
            return
        # large sources: check the fast path once, here, for all workers
        self.fast, self.fast_why, excluded = fast_path_ok(encoder_args)
        encoder_args = (*encoder_args[:4], excluded if self.fast else False)
        if self.fast and os.environ.get("CPT_PREP_POOL", "thread") == "thread":
            self.encoder = Encoder(*encoder_args)
            self.threads = ThreadPoolExecutor(workers, thread_name_prefix="cpt-encode")
            return
        # fork: fast, and unlike spawn it does not re-import the caller's __main__. Workers use
        # only the encoder they build themselves, single-threaded, so no parent thread matters.
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.pool = ctx.Pool(workers, initializer=_init, initargs=(encoder_args,))

    def map(self, batches: Iterable[tuple[Any, list[str]]]) -> Iterator[tuple[Any, tuple]]:
        """Yield (meta, encoded) for each (meta, texts), in order."""
        if self.pool is None and self.threads is None:
            for meta, texts in batches:
                yield meta, self.encoder(texts)
            return
        if self.threads is not None:
            submit = lambda texts: self.threads.submit(self.encoder, texts)  # noqa: E731
            get = lambda fut: fut.result()  # noqa: E731
        else:
            submit = lambda texts: self.pool.apply_async(_encode, (texts,))  # noqa: E731
            get = lambda res: res.get()  # noqa: E731
        inflight: deque = deque()
        try:
            for meta, texts in batches:
                inflight.append((meta, submit(texts)))
                if len(inflight) >= 2 * self.workers:
                    meta0, res = inflight.popleft()
                    yield meta0, get(res)
            while inflight:
                meta0, res = inflight.popleft()
                yield meta0, get(res)
        finally:
            for _, res in inflight:  # an error or an early stop: queued batches are not encoded
                if hasattr(res, "cancel"):
                    res.cancel()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None
        if self.threads is not None:
            self.threads.shutdown(wait=True, cancel_futures=True)
            self.threads = None
