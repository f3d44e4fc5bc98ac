"""Batch tokenization, in worker processes: texts → one flat token array (BOS/EOS added) + lengths.

Workers only import numpy and `tokenizers` (the Rust tokenizer, rebuilt from its JSON), so they
start fast; each runs single-threaded and the pool gives the parallelism. Results come back in
submission order with a bounded number of batches in flight, so memory does not grow with the
corpus. A batch's output depends only on its texts: the token stream is identical whatever the
number of workers or the batch boundaries.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
from collections import deque
from typing import Any, Iterable, Iterator, Optional

import numpy as np


class Encoder:
    def __init__(self, tokenizer_json: str, bos_id: Optional[int], eos_id: int, dtype: str):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(tokenizer_json)
        self.bos_id, self.eos_id, self.dtype = bos_id, eos_id, np.dtype(dtype)

    def _ids(self, texts: list[str]) -> tuple[list[list[int]], list[int]]:
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
        content = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        extra = 1 + (self.bos_id is not None)
        lens = content + extra
        if bad:
            lens[bad] = 0  # an unencodable document contributes nothing (the caller counts it)
        ends = np.cumsum(lens)
        out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=self.dtype)
        keep = np.ones(len(out), dtype=bool)
        good = lens > 0
        keep[ends[good] - 1] = False
        out[ends[good] - 1] = self.eos_id
        if self.bos_id is not None:
            starts = (ends - lens)[good]
            keep[starts] = False
            out[starts] = self.bos_id
        out[keep] = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(content.sum()))
        return out, lens, bad


_ENCODER: Optional[Encoder] = None


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
    """Ordered, bounded parallel map of Encoder over batches; `workers <= 1` encodes in-process."""

    def __init__(self, encoder_args: tuple, workers: int):
        self.workers = workers
        if workers > 1:
            # fork: fast, and unlike spawn it does not re-import the caller's __main__. Workers use
            # only the Rust tokenizer they build themselves, single-threaded, so no parent thread matters.
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            self.pool = ctx.Pool(workers, initializer=_init, initargs=(encoder_args,))
            self.encoder = None
        else:
            self.pool = None
            self.encoder = Encoder(*encoder_args)

    def map(self, batches: Iterable[tuple[Any, list[str]]]) -> Iterator[tuple[Any, tuple]]:
        """Yield (meta, encoded) for each (meta, texts), in order."""
        if self.pool is None:
            for meta, texts in batches:
                yield meta, self.encoder(texts)
            return
        inflight: deque = deque()
        for meta, texts in batches:
            inflight.append((meta, self.pool.apply_async(_encode, (texts,))))
            if len(inflight) >= 2 * self.workers:
                meta0, res = inflight.popleft()
                yield meta0, res.get()
        while inflight:
            meta0, res = inflight.popleft()
            yield meta0, res.get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None
