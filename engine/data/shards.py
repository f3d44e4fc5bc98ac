"""Fixed-size token shards on disk, and a memory-mapped view of a split as one token stream.

A split (`train`, `val`) is the files `<split>-00000.bin`, `<split>-00001.bin`, ... of exactly
`shard_tokens` tokens each (the last one shorter). Files are only ever appended to; the committed
length of a split lives in the source's progress record, written after the data is fsynced. On
resume, files are truncated back to that length, so whatever was written after the last commit
(a torn write from kill -9, or a partial write when the disk filled up) is discarded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:05d}.bin"


class ShardWriter:
    def __init__(self, out_dir: Path, split: str, shard_tokens: int, dtype: np.dtype, committed: int = 0):
        self.dir, self.split, self.shard_tokens, self.dtype = Path(out_dir), split, shard_tokens, np.dtype(dtype)
        self.tokens = committed
        self._f = None
        self._unsynced: list = []  # closed shards not yet fsynced
        self._truncate_to(committed)

    def _path(self, i: int) -> Path:
        return self.dir / shard_name(self.split, i)

    def _truncate_to(self, tokens: int) -> None:
        """Drop everything after `tokens`: later shards are deleted, the last one is cut."""
        last = tokens // self.shard_tokens  # index of the shard the next token goes to
        for p in self.dir.glob(f"{self.split}-*.bin"):
            if int(p.stem.split("-")[1]) > last:
                p.unlink()
        p = self._path(last)
        with open(p, "ab") as f:
            f.truncate((tokens - last * self.shard_tokens) * self.dtype.itemsize)

    def write(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        while len(arr):
            i = self.tokens // self.shard_tokens
            room = (i + 1) * self.shard_tokens - self.tokens
            if self._f is None:
                self._f = open(self._path(i), "ab")
            part, arr = arr[:room], arr[room:]
            self._f.write(memoryview(part).cast("B"))
            self.tokens += len(part)
            if len(part) == room:  # the shard is full: the next token opens the next file
                self._f.flush()
                self._unsynced.append(self._f)
                self._f = None

    def sync(self) -> None:
        """Flush and fsync everything written so far (before a progress record may claim it)."""
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
        for f in self._unsynced:
            os.fsync(f.fileno())
            f.close()
        self._unsynced = []

    def close(self) -> None:
        self.sync()
        if self._f is not None:
            self._f.close()
            self._f = None

    def shards(self) -> list[dict]:
        n = -(-self.tokens // self.shard_tokens) if self.tokens else 0
        return [{"file": shard_name(self.split, i), "tokens": min(self.shard_tokens, self.tokens - i * self.shard_tokens)}
                for i in range(n)]


class TokenStream:
    """The shards of a split as one read-only sequence of tokens (slices may cross shards)."""

    def __init__(self, source_dir: str | Path, shards: list[dict], dtype: str):
        self.dtype = np.dtype(dtype)
        self._paths = [Path(source_dir) / s["file"] for s in shards if s["tokens"]]
        sizes = [s["tokens"] for s in shards if s["tokens"]]
        self.ends = np.cumsum(sizes, dtype=np.int64) if sizes else np.zeros(0, np.int64)
        self._maps: list[Optional[np.memmap]] = [None] * len(self._paths)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _map(self, i: int) -> np.memmap:
        if self._maps[i] is None:
            self._maps[i] = np.memmap(self._paths[i], dtype=self.dtype, mode="r")
        return self._maps[i]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            k = int(key) + (len(self) if key < 0 else 0)
            return self[k:k + 1][0]
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("TokenStream slices must be contiguous")
        if stop <= start:
            return np.zeros(0, self.dtype)
        first = int(np.searchsorted(self.ends, start, side="right"))
        parts = []
        i = first
        while start < stop:
            base = int(self.ends[i - 1]) if i else 0
            end = min(stop, int(self.ends[i]))
            parts.append(self._map(i)[start - base:end - base])
            start = end
            i += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __array__(self, dtype=None, copy=None):
        arr = self[:]
        return arr.astype(dtype) if dtype is not None else np.asarray(arr)
