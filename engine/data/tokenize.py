"""Batch tokenization: texts → one flat token array (BOS/EOS added) + lengths.

For byte-level BPE tokenizers whose vocabulary is rank-consistent (GPT-2, Llama 3, Qwen 2/3,
HF-trained) documents are encoded by tiktoken with ranks derived from the tokenizer itself
(engine.data.tiktoken_bpe: derived and checked once here, in the parent; CPT_PREP_FAST=0 turns it
off), in threads of this process: tiktoken releases the GIL while it encodes and hands back a
buffer, not Python ints. Every other tokenizer, the documents that path does not take, and small
inputs (encoded in-process) use the Rust tokenizer; for large inputs in one worker process per core
(workers import only numpy and `tokenizers`, so they start fast). Results come back in submission
order with a bounded window of batches in flight (in characters: a batch with one very long
document does not stall the other workers), so memory does not grow with the corpus. A batch's
output depends only on its texts: the token stream is identical whatever the number of workers or
threads or the batch boundaries, and with the fast path on or off. The fast path is built and
checked once per process and tokenizer (`_fast_setup`) and shared by the threads; a thread does a
batch's checks, encoding, sampled cross-check and packing (one output array, ids cast into place),
so the main thread only reads, routes and writes.
"""

from __future__ import annotations

import array
import functools
import multiprocessing as mp
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Optional

import numpy as np


# Batches in flight (EncodePool.map): at least 2 per worker, more while their texts total less than this
# many characters (~2-4 bytes each in memory, plus ~1 byte of ids), at most MAX_INFLIGHT.
WINDOW_CHARS = int(os.environ.get("CPT_PREP_WINDOW_CHARS", 24 << 20))
MAX_INFLIGHT = 64
VERIFY_EVERY = 64  # the fast path's sampled cross-check against the Rust tokenizer (see Encoder._verify)
# A sampled document longer than this is not re-encoded: the Rust tokenizer's Encoding costs ~100 bytes
# per token (a 9 MB document: ~250 MB), so the check's memory would grow with the longest document.
VERIFY_MAX_CHARS = 1 << 20


_SHARED: dict[str, Any] = {}  # tokenizer JSON → a Rust tokenizer of this process built from it (share_backend)


def share_backend(tokenizer_json: str, backend) -> None:
    """`backend` is a Rust tokenizer whose to_str() is `tokenizer_json` (engine.data.pack.Tokenizer's):
    encoders of this process use it instead of building the same tokenizer again (~0.5 s at 100k+)."""
    _SHARED[tokenizer_json] = backend


class _LazyTok:
    """A Rust tokenizer built from its JSON on first use (~0.5 s at 100k+, holding the GIL): with the
    tiktoken path and the cross-check in a helper process, the parent needs it only for documents
    the path does not take, or for a start-up check whose verdict is not cached."""

    def __init__(self, tokenizer_json: str):
        self._json, self._tok, self._lock = tokenizer_json, None, threading.Lock()

    def __getattr__(self, name):
        if self._tok is None:
            with self._lock:
                if self._tok is None:
                    from tokenizers import Tokenizer
                    self._tok = Tokenizer.from_str(self._json)
        return getattr(self._tok, name)


class Encoder:
    """Thread-safe: the tiktoken path and the Rust tokenizer are both immutable once built."""

    def __init__(self, tokenizer_json: str, bos_id: Optional[int], eos_id: int, dtype: str, fast=False, tok=None,
                 checker: Optional["_Checker"] = None):
        if tok is None:
            tok = _SHARED.get(tokenizer_json)
        if tok is None:
            from tokenizers import Tokenizer
            tok = Tokenizer.from_str(tokenizer_json)
        self.tok = tok
        self.bos_id, self.eos_id, self.dtype = bos_id, eos_id, np.dtype(dtype)
        # fast: False (Rust only), True (run the start-up check, its verdict cached), the characters
        # the caller's check (fast_path_ok) excluded (the path is exact here for the others), or the
        # checked path itself (TiktokenBPE, shared by the threads of this process)
        self.fast = None
        self._lock = threading.Lock()
        self._numbered = 0  # documents numbered by this encoder itself (calls without `first`)
        self.checked_docs = 0  # documents the sampled cross-check re-encoded
        self.skipped_long = 0  # sampled documents over VERIFY_MAX_CHARS (not re-encoded)
        self.checker = checker  # the cross-check in a helper process (EncodePool), else here, synchronously
        if hasattr(fast, "ids_batch"):
            self.fast = fast
        elif fast is not False and fast is not None:
            from engine.data.tiktoken_bpe import TiktokenBPE
            self.fast = TiktokenBPE.build(self.tok, tokenizer_json, check=fast)[0]
        self._local, self._spare = threading.local(), self.fast

    def _ids(self, texts: list[str], first: Optional[int]) -> tuple[list, list[int]]:
        if self.fast is None:
            return self._rust_ids(texts)
        ids = self._thread_fast().ids_batch(texts)
        self._verify(texts, ids, first)
        rest = [i for i, x in enumerate(ids) if x is None]
        if not rest:
            return ids, []
        rids, rbad = self._rust_ids([texts[i] for i in rest])
        for i, x in zip(rest, rids):
            ids[i] = x
        return ids, [rest[j] for j in rbad]

    def _thread_fast(self):
        """This thread's tiktoken encoder: one per thread (the first thread takes `self.fast`, the others
        a copy). Threads sharing one tiktoken CoreBPE contend inside it (its regex's scratch space):
        measured here, two threads sharing one took ~15-25% more CPU for the same ids."""
        f = getattr(self._local, "fast", None)
        if f is None:
            with self._lock:
                f, self._spare = (self._spare, None) if self._spare is not None else (None, None)
            self._local.fast = f = f if f is not None else self.fast.copy()
        return f

    def _verify(self, texts: list[str], ids: list, first: Optional[int]) -> None:
        """Documents number 0, 64, 128, ... (VERIFY_EVERY) of the stream (`first`: the number of the
        batch's first document, counted from the start of this run) that the fast path took are
        encoded by the Rust tokenizer too: a disagreement the start-up checks missed stops the
        preparation (no source is marked complete) instead of training on wrong ids. The choice
        depends only on the documents' positions, not on thread timing. Sampled documents over
        VERIFY_MAX_CHARS are counted (`skipped_long`), not re-encoded: bounded memory."""
        if first is None:  # a direct call: number the documents in the order of the calls
            with self._lock:
                first, self._numbered = self._numbered, self._numbered + len(texts)
        sampled = [i for i in range(-first % VERIFY_EVERY, len(texts), VERIFY_EVERY) if ids[i] is not None]
        pick = [i for i in sampled if len(texts[i]) <= VERIFY_MAX_CHARS]
        with self._lock:
            self.checked_docs += len(pick)
            self.skipped_long += len(sampled) - len(pick)
        if not pick:
            return
        sample, got = [texts[i] for i in pick], [ids[i] for i in pick]
        if self.checker is not None:  # its verdict is awaited before the next commit (EncodePool.settle)
            self.checker.submit(sample, got)
            return
        # encode_batch_fast releases the GIL (encode does not: it would stall the other threads)
        why = _compare(sample, got, self.tok.encode_batch_fast(sample, add_special_tokens=False))
        if why:
            raise _mismatch(why)

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

    def __call__(self, texts: list[str], first: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(tokens of all documents, each followed by EOS and preceded by BOS if used; lengths; bad
        indices). `first`: the stream number of the first document (for the sampled cross-check)."""
        ids, bad = self._ids(texts, first)
        extra = 1 + (self.bos_id is not None)
        lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + extra
        if bad:
            lens[bad] = 0  # an unencodable document contributes nothing (the caller counts it)
        ends = np.cumsum(lens)
        out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=self.dtype)
        if not len(out):
            return out, lens, bad
        # one pass: each document's ids cast into place, then EOS (and BOS) at their offsets
        starts = ends - lens
        first_id = (starts + (extra - 1)).tolist()
        for i, x in enumerate(ids):
            if len(x):
                out[first_id[i]:first_id[i] + len(x)] = x if isinstance(x, np.ndarray) else array.array("I", x)
        valid = lens > 0
        out[ends[valid] - 1] = self.eos_id
        if self.bos_id is not None:
            out[starts[valid]] = self.bos_id
        return out, lens, bad


def _compare(texts: list[str], got: list, refs) -> str:
    """"" when each document's ids equal the Rust tokenizer's Encoding, else the first that differs."""
    for t, x, e in zip(texts, got, refs):
        ref = e.ids
        if len(ref) != len(x) or not np.array_equal(np.asarray(array.array("I", ref)), x):
            return t[:60]
    return ""


def _mismatch(start: str):
    from engine.data.sources import DataError
    from engine.data.tiktoken_bpe import SWITCH

    return DataError(f"the tiktoken tokenization path (engine/data/tiktoken_bpe.py) disagrees with the "
                     f"tokenizer on a document starting {start!r}; rerun with {SWITCH} "
                     "(the Rust tokenizer only) and please report it")


class _Checker:
    """The sampled cross-check of the thread pool, in one helper process with its own Rust tokenizer.

    Started with the pool as a fresh interpreter (`python -c`: it re-imports none of the caller's
    code and shares no pages with it), it builds the tokenizer on the other core while this process
    sets up the tiktoken path. Checks go to it in order through a pipe (a writer thread: an encoder
    thread never waits for it); `settle` waits for the verdicts of everything submitted so far and
    raises the mismatch DataError, so a commit never claims unchecked data. The helper ends with
    this process (PR_SET_PDEATHSIG) or when its input closes; if it dies, `settle` says so."""

    def __init__(self, tokenizer_json: str):
        import pickle
        import queue
        import subprocess
        import sys
        from pathlib import Path

        root = str(Path(__file__).resolve().parents[2])  # the directory holding the engine package
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        self.proc = subprocess.Popen([sys.executable, "-c", "from engine.data.tokenize import _check_main; _check_main()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._dump, self._load = pickle.dump, pickle.load
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._sent = 0  # checks submitted; their verdicts come back in this order
        self._lock = threading.Lock()
        self._queue.put(tokenizer_json)
        self._writer = threading.Thread(target=self._write, name="cpt-check-writer", daemon=True)
        self._writer.start()

    def _write(self) -> None:
        try:
            while True:
                msg = self._queue.get()
                if msg is None:
                    break
                self._dump(msg, self.proc.stdin, protocol=5)
                self.proc.stdin.flush()
        except (OSError, ValueError):  # the helper is gone: settle reports it
            pass

    def submit(self, texts: list[str], got: list) -> None:
        with self._lock:
            self._sent += 1
            self._queue.put((texts, [g.tobytes() for g in got]))

    def settle(self) -> None:
        with self._lock:
            n, self._sent = self._sent, 0
        for _ in range(n):
            try:
                why = self._load(self.proc.stdout)
            except (EOFError, OSError, ValueError):
                from engine.data.sources import DataError
                try:
                    code = self.proc.wait(timeout=5)
                except Exception:
                    code = None
                raise DataError("the process of the sampled tiktoken cross-check ended "
                                f"(exit status {code}); rerun, or set CPT_PREP_FAST=0") from None
            if why:
                raise _mismatch(why)

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=5)
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except Exception:
            self.proc.kill()
            self.proc.wait()


def _check_main() -> None:
    """The helper process of _Checker: the tokenizer JSON, then (texts, ids) checks, one verdict each."""
    import pickle
    import sys

    try:  # die with the parent
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    from tokenizers import Tokenizer

    inp, out = sys.stdin.buffer, sys.stdout.buffer
    tok = Tokenizer.from_str(pickle.load(inp))
    while True:
        try:
            texts, got = pickle.load(inp)
        except EOFError:
            return
        why = ""
        for t, g in zip(texts, got):  # one at a time: one document's Encoding in memory at once
            why = why or _compare([t], [np.frombuffer(g, dtype=np.uint32)], tok.encode_batch_fast([t], add_special_tokens=False))
        pickle.dump(why, out)
        out.flush()


@functools.lru_cache(maxsize=4)
def _fast_setup(tokenizer_json: str) -> tuple[Any, Any, str]:
    """(the Rust tokenizer, the checked tiktoken path or None, why not): built once per process and
    tokenizer, shared by fast_path_ok and the threads of EncodePool. The Rust tokenizer is the
    caller's (share_backend) or built on first use."""
    from engine.data.tiktoken_bpe import TiktokenBPE
    tok = _SHARED.get(tokenizer_json) or _LazyTok(tokenizer_json)
    fast, why = TiktokenBPE.build(tok, tokenizer_json)
    return tok, fast, why


_ENCODER: Optional[Encoder] = None


def fast_path_ok(encoder_args: tuple) -> tuple[bool, str, tuple]:
    """(is the exact tiktoken path usable for this tokenizer, why not, the characters the start-up
    check excluded). CPT_PREP_FAST=0: never."""
    if os.environ.get("CPT_PREP_FAST", "1") == "0":
        return False, "CPT_PREP_FAST=0", ()
    _, fast, why = _fast_setup(encoder_args[0])
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


def _encode(texts: list[str], first: int):
    return _ENCODER(texts, first)


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
        self.pool = self.threads = self.encoder = self.checker = None
        self.fast, self.fast_why = False, "small input: encoded in-process by the Rust tokenizer"
        if workers <= 1:
            self.encoder = Encoder(*encoder_args)
            return
        # large sources: check the fast path once, here, for all workers
        self.fast, self.fast_why, excluded = fast_path_ok(encoder_args)
        if self.fast and os.environ.get("CPT_PREP_POOL", "thread") == "thread":
            tok, fast, _ = _fast_setup(encoder_args[0])  # built by fast_path_ok: not built twice
            self.checker = _Checker(encoder_args[0])
            self.encoder = Encoder(*encoder_args[:4], fast=fast, tok=tok, checker=self.checker)
            self.threads = ThreadPoolExecutor(workers, thread_name_prefix="cpt-encode")
            return
        encoder_args = (*encoder_args[:4], excluded if self.fast else False)
        # fork: fast, and unlike spawn it does not re-import the caller's __main__. Workers use
        # only the encoder they build themselves, single-threaded, so no parent thread matters.
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.pool = ctx.Pool(workers, initializer=_init, initargs=(encoder_args,))

    def map(self, batches: Iterable[tuple[Any, list[str]]]) -> Iterator[tuple[Any, tuple]]:
        """Yield (meta, encoded) for each (meta, texts), in order.

        Batches are queued while fewer than 2 per worker are in flight or their texts total less than
        WINDOW_CHARS: a batch holding one very long document keeps one worker busy for seconds, and
        the others go on with the batches after it instead of waiting for it to be written. Memory
        stays bounded by the window, whatever the corpus size."""
        first = 0  # the stream number of each batch's first document (the sampled cross-check)
        if self.pool is None and self.threads is None:
            for meta, texts in batches:
                yield meta, self.encoder(texts, first)
                first += len(texts)
            return
        if self.threads is not None:
            submit = lambda texts, k: self.threads.submit(self.encoder, texts, k)  # noqa: E731
            get = lambda fut: fut.result()  # noqa: E731
        else:
            submit = lambda texts, k: self.pool.apply_async(_encode, (texts, k))  # noqa: E731
            get = lambda res: res.get()  # noqa: E731
        inflight: deque = deque()
        chars = 0
        try:
            for meta, texts in batches:
                n = sum(map(len, texts))
                inflight.append((meta, submit(texts, first), n))
                first += len(texts)
                chars += n
                while len(inflight) > MAX_INFLIGHT or (len(inflight) > 2 * self.workers and chars > WINDOW_CHARS):
                    meta0, res, n0 = inflight.popleft()
                    chars -= n0
                    yield meta0, get(res)
            while inflight:
                meta0, res, _ = inflight.popleft()
                yield meta0, get(res)
        finally:
            for _, res, _ in inflight:  # an error or an early stop: queued batches are not encoded
                if hasattr(res, "cancel"):
                    res.cancel()

    def settle(self) -> None:
        """Wait for the sampled cross-checks of the batches returned so far (before a commit claims
        them): DataError on a mismatch."""
        if self.checker is not None:
            self.checker.settle()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None
        if self.threads is not None:
            self.threads.shutdown(wait=True, cancel_futures=True)
            self.threads = None
        if self.checker is not None:
            self.checker.close()
            self.checker = None
