"""Long-document upsampling for a stage (Gao et al. 2024, "How to train long-context language models
(effectively)": keep the data mixture, upsample long documents within each dataset).

For a stage with `long_docs: {min_tokens, share}`, every source of its mixture gets a *view*: a
directory whose manifest lists segments `[start, end)` of the source's prepared train stream (read
with the boundary index). With L tokens in documents of >= min_tokens and S in the others (T = L + S),
long documents are repeated share·T/L times and short ones share (1-share)·T/S, so the view has T
tokens — the source's weight in the mixture is unchanged — of which `share` come from long
documents. Whole passes repeat every document of a group; the fractional pass takes a seeded random
subset of it, the last document cut to hit the share to the token. Nothing is copied: the view's
stream is a SegmentStream over the source's memory-mapped shards; its validation split is the
source's. The stage JSON points the stage at the views (`stage_sources`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np

from engine.data.shards import TokenStream


def _group_copies(idx: np.ndarray, lengths: np.ndarray, factor: float, rng) -> tuple[np.ndarray, Optional[tuple]]:
    """Whole copies per document of a group, plus (doc, prefix tokens) for the one cut document."""
    copies = np.zeros(len(lengths), np.int64)
    if not len(idx) or factor <= 0:
        return copies, None
    full = int(np.floor(factor))
    copies[idx] = full
    want = round((factor - full) * int(lengths[idx].sum()))
    if want <= 0:
        return copies, None
    order = rng.permutation(idx)
    cum = np.cumsum(lengths[order])
    k = int(np.searchsorted(cum, want, side="left"))
    copies[order[:k]] += 1
    rest = want - (int(cum[k - 1]) if k else 0)
    return copies, ((int(order[k]), rest) if k < len(order) and rest > 0 else None)


def plan_view(lengths: np.ndarray, min_tokens: int, share: float, seed: int) -> dict:
    """Segments of a view (in document-start order per pass) and its report; lengths per train document."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
    long = lengths >= min_tokens
    L, T = int(lengths[long].sum()), int(lengths.sum())
    S = T - L
    rep = {"min_tokens": min_tokens, "share": share, "available_share": L / T if T else 0.0,
           "long_documents": int(long.sum()), "documents": len(lengths), "warnings": []}
    if L == 0 or S == 0:
        fl = fs = 1.0
        rep["warnings"].append(f"no {'long' if L == 0 else 'short'} documents (min_tokens={min_tokens}): "
                               "the source is used as it is")
    else:
        fl, fs = share * T / L, (1 - share) * T / S
    rng = np.random.default_rng([seed, min_tokens])
    cl, cut_l = _group_copies(np.flatnonzero(long), lengths, fl, rng)
    cs, cut_s = _group_copies(np.flatnonzero(~long), lengths, fs, rng)
    copies = cl + cs
    segs = []
    for p in range(int(copies.max()) if len(copies) else 0):
        d = np.flatnonzero(copies > p)
        segs.append(np.stack([starts[d], starts[d] + lengths[d]], 1))
    for cut in (cut_l, cut_s):
        if cut:
            segs.append(np.array([[starts[cut[0]], starts[cut[0]] + cut[1]]]))
    seg = np.concatenate(segs) if segs else np.zeros((0, 2), np.int64)
    # Merge touching segments (runs of kept documents) to keep the index small.
    if len(seg) > 1:
        brk = np.flatnonzero(seg[1:, 0] != seg[:-1, 1]) + 1
        first = np.concatenate([[0], brk])
        last = np.concatenate([brk - 1, [len(seg) - 1]])
        seg = np.stack([seg[first, 0], seg[last, 1]], 1)
    long_tok = int((cl * lengths).sum()) + (cut_l[1] if cut_l else 0)
    tokens = int((seg[:, 1] - seg[:, 0]).sum())
    rep.update({"tokens": tokens, "source_tokens": T, "realised_share": long_tok / tokens if tokens else 0.0,
                "long_repeats": fl, "short_rate": fs})
    return {"segments": seg.astype(np.int64), "report": rep}


class SegmentStream:
    """A view's train stream: its segments of the base stream, as one sliceable sequence."""

    def __init__(self, view_dir: Path, sp: dict):
        v = sp["view"]
        base_man = json.loads((Path(v["base"]) / "manifest.json").read_text())
        self.base = TokenStream(v["base"], base_man["train"]["shards"], base_man["dtype"])
        self.dtype = self.base.dtype
        self.seg = np.load(Path(view_dir) / v["segments"], mmap_mode="r")
        lens = self.seg[:, 1] - self.seg[:, 0]
        self.ends = np.cumsum(lens) if len(lens) else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            k = int(key) + (len(self) if key < 0 else 0)
            return self[k:k + 1][0]
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("SegmentStream slices must be contiguous")
        parts = []
        i = int(np.searchsorted(self.ends, start, side="right"))
        while start < stop:
            seg_start = int(self.ends[i - 1]) if i else 0
            end = min(stop, int(self.ends[i]))
            off = int(self.seg[i, 0]) - seg_start
            parts.append(self.base[start + off:end + off])
            start = end
            i += 1
        if not parts:
            return np.zeros(0, self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __array__(self, dtype=None, copy=None):
        arr = self[:]
        return arr.astype(dtype) if dtype is not None else np.asarray(arr)


def build_view(base_dir: Path, min_tokens: int, share: float, seed: int) -> tuple[Path, dict]:
    """The view of a prepared source for (min_tokens, share, seed): its directory and manifest (cached)."""
    from engine.data.pack import open_boundaries, write_json_atomic
    from engine.data.sources import DataError
    base_dir = Path(base_dir)
    man = json.loads((base_dir / "manifest.json").read_text())
    key = hashlib.sha256(f"{man['fingerprint']}|{min_tokens}|{share!r}|{seed}".encode()).hexdigest()[:12]
    out = base_dir.parent / f"{base_dir.name}.long-{key}"
    if (out / "manifest.json").exists():
        return out, json.loads((out / "manifest.json").read_text())
    if man.get("foreign") and not man["foreign"].get("boundaries_known", True):
        raise DataError(f"source {man['source']!r}: long_docs needs document boundaries, but its "
                        f"{man['foreign']['format']} data keeps none (packed samples / fixed-length rows); use a "
                        "source with boundaries or drop long_docs from the stage")
    starts = open_boundaries(base_dir)
    if starts is None:
        raise DataError(f"source {man['source']!r}: no boundary index in {base_dir}; long_docs needs keep_boundaries")
    n = man["train"]["tokens"]
    lengths = np.diff(np.append(np.asarray(starts, dtype=np.int64), n))
    v = plan_view(lengths, min_tokens, share, seed)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "segments.npy", v["segments"])
    val = {**man["val"], "shards": [{**s, "file": str(base_dir / s["file"])} for s in man["val"]["shards"]]}
    vman = {**man, "train": {"tokens": v["report"]["tokens"], "documents": None,
                             "view": {"base": str(base_dir), "segments": "segments.npy"}},
            "val": val, "boundaries": None, "long_docs": v["report"],
            "spec_fingerprint": None,  # a view is not the source: cache lookups by spec must not find it
            "view_of": man["spec_fingerprint"]}
    write_json_atomic(out / "manifest.json", vman)
    return out, vman


def stage_sources(prepared: dict, stage_name: str) -> dict:
    """The prepared sources a stage trains on: the long_docs views of its stage where there are any."""
    views = prepared.get("stage_sources", {}).get(stage_name, {})
    return {n: {**s, **views.get(n, {})} for n, s in prepared["sources"].items()}
