"""Batch tokenization, in worker processes: texts → one flat token array (BOS/EOS added) + lengths.

Workers only import numpy, `tokenizers` (the Rust tokenizer, rebuilt from its JSON) and `regex`, so they
start fast; each runs single-threaded and the pool gives the parallelism. Results come back in
submission order with a bounded number of batches in flight, so memory does not grow with the
corpus. With a pool, the workers use the exact fast path of engine.data.fastbpe for byte-level BPE
tokenizers (checked once here, in the parent; CPT_PREP_FAST=0 turns it off); documents it does not
take, and in-process encoding, use the Rust tokenizer. A batch's output depends only on its texts:
the token stream is identical whatever the number of workers or the batch boundaries.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
from collections import deque
from typing import Any, Iterable, Iterator, Optional

import numpy as np


VERIFY_EVERY = 64  # the fast path's sampled cross-check against the Rust tokenizer (see Encoder._verify)


class Encoder:
    def __init__(self, tokenizer_json: str, bos_id: Optional[int], eos_id: int, dtype: str, fast: bool = False):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(tokenizer_json)
        self.bos_id, self.eos_id, self.dtype = bos_id, eos_id, np.dtype(dtype)
        # fast: the caller checked (FastBPE.build with the probe) that the fast path is exact here
        self.fast = None
        self.fast_docs = 0  # documents taken by the fast path so far (for the sampled check)
        if fast:
            from engine.data.fastbpe import FastBPE
            self.fast = FastBPE.build(self.tok, tokenizer_json, probe=False)

    def _ids(self, texts: list[str]) -> tuple[list[list[int]], list[int]]:
        if self.fast is None:
            return self._rust_ids(texts)
        fast = self.fast
        ids = [fast(t) for t in texts]
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
        instead of training on wrong ids. Costs ~2% of the encoding time."""
        for i, x in enumerate(ids):
            if x is None:
                continue
            self.fast_docs += 1
            if self.fast_docs % VERIFY_EVERY == 1:
                ref = self.tok.encode(texts[i], add_special_tokens=False).ids
                if ref != x:
                    from engine.data.sources import DataError

                    raise DataError(f"the fast tokenization path (engine/data/fastbpe.py) disagrees with the "
                                    f"tokenizer on a document starting {texts[i][:60]!r}; rerun with "
                                    "CPT_PREP_FAST=0 and please report it")

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


def fast_path_ok(encoder_args: tuple) -> bool:
    """Is the exact fast path (engine.data.fastbpe) usable for this tokenizer? CPT_PREP_FAST=0: never."""
    if os.environ.get("CPT_PREP_FAST", "1") == "0":
        return False
    from tokenizers import Tokenizer

    from engine.data.fastbpe import FastBPE
    return FastBPE.build(Tokenizer.from_str(encoder_args[0]), encoder_args[0]) is not None


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
        if workers > 1:  # large sources: check the fast path once, here, for all workers
            encoder_args = (*encoder_args[:4], fast_path_ok(encoder_args))
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
