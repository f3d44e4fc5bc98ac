"""`sample: shuffled`: a seeded random subset of a source's documents up to max_tokens (LLM-Foundry's --shuffle).

The source is prepared once whole (its own cached directory, with the boundary index), then the
subset is cut from it: the documents are permuted by `numpy.random.default_rng(sample_seed)` (PCG64:
the same on every machine and numpy version), taken in permutation order until max_tokens, the last
one cut so the train split has exactly max_tokens tokens, and written in file order. Memory is 16
bytes per document (lengths + permutation), never the source itself. The validation split is the
whole source's (taken before sampling), so it never overlaps the training subset.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

import numpy as np

from engine.data.shards import ShardWriter

CHUNK_TOKENS = 1 << 24


def shuffled_take(lengths: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Tokens taken from each document (0, its length, or a prefix for the last one drawn)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(len(lengths))
    cum = np.cumsum(lengths[perm])
    take = np.zeros(len(lengths), np.int64)
    k = int(np.searchsorted(cum, cap, side="left"))  # perm[k] is the document that reaches the cap
    if k >= len(perm):
        return lengths.copy()
    take[perm[:k]] = lengths[perm[:k]]
    take[perm[k]] = cap - (int(cum[k - 1]) if k else 0)
    return take


def doc_lengths(source_dir: Path, n_tokens: int) -> np.ndarray:
    from engine.data.pack import open_boundaries
    starts = open_boundaries(source_dir)
    if starts is None:
        return np.array([n_tokens], np.int64) if n_tokens else np.zeros(0, np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    return np.diff(np.append(starts, n_tokens))


def prepare_shuffled(spec, name, tokenizer, out: Path, fp: str, tok_fp: str, progress, pool) -> dict:
    from engine.data.pack import (_complete, fsync_dir, open_tokens, prepare_source, shard_tokens, source_fingerprint,
                                  spec_fingerprint, write_json_atomic)
    full_spec = spec.model_copy(update={"sample": "first", "sample_seed": 0, "max_tokens": None, "keep_boundaries": True})
    full_dir = out.parent / f"{name}-{source_fingerprint(full_spec, tok_fp)}"
    full = prepare_source(full_spec, name, tokenizer, full_dir, tok_fp, progress, pool)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        man = _complete(out, fp)
        if man:
            return man
        (out / "manifest.json").unlink(missing_ok=True)
        stream = open_tokens(full_dir, "train")
        n = len(stream)
        lengths = doc_lengths(full_dir, n)
        take = shuffled_take(lengths, spec.max_tokens, spec.sample_seed)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
        S = shard_tokens()
        for p in list(out.glob("train-*.bin")) + list(out.glob("val-*.bin")):
            p.unlink()
        train = ShardWriter(out, "train", S, tokenizer.dtype, 0)
        kept = np.flatnonzero(take)
        new_starts = []
        i = 0
        while i < len(kept):  # runs of kept documents in file order, a chunk of the full stream at a time
            j = int(np.searchsorted(starts[kept], starts[kept[i]] + CHUNK_TOKENS, side="left"))
            j = max(j, i + 1)
            docs = kept[i:j]
            a, b = int(starts[docs[0]]), int(starts[docs[-1]] + lengths[docs[-1]])
            chunk = np.asarray(stream[a:b])
            seg_take = take[docs[0]:docs[-1] + 1]
            seg_len = lengths[docs[0]:docs[-1] + 1]
            doc_of = np.repeat(np.arange(len(seg_len)), seg_len)
            pos = np.arange(len(chunk)) - (starts[docs[0]:docs[-1] + 1] - a)[doc_of]
            new_starts.append(train.tokens + np.concatenate([[0], np.cumsum(take[docs])[:-1]]))
            train.write(chunk[pos < seg_take[doc_of]])
            i = j
        train.close()
        val = ShardWriter(out, "val", S, tokenizer.dtype, 0)
        vs = open_tokens(full_dir, "val")
        for a in range(0, len(vs), CHUNK_TOKENS):
            val.write(np.asarray(vs[a:a + CHUNK_TOKENS]))
        val.close()
        bounds = None
        if spec.keep_boundaries:
            allst = np.concatenate(new_starts) if new_starts else np.zeros(0, np.int64)
            allst.astype(np.uint64).tofile(out / "train-docs.idx")
            bounds = {"file": "train-docs.idx", "documents": len(allst)}
        man = {**full, "fingerprint": fp, "spec_fingerprint": spec_fingerprint(spec),
               "train": {"tokens": train.tokens, "documents": len(kept), "shards": train.shards()},
               "val": {"tokens": val.tokens, "documents": full["val"]["documents"], "shards": val.shards()},
               "boundaries": bounds,
               "sample": {"mode": "shuffled", "seed": spec.sample_seed, "documents": len(kept),
                          "of_documents": len(lengths), "of_tokens": n, "from": str(full_dir)}}
        write_json_atomic(out / "manifest.json", man)
        (out / "progress.json").unlink(missing_ok=True)
        fsync_dir(out)
        return man
