"""Mixtures: realised weights within 1 %, validation never trained on, deterministic order across
processes, O(1) resume, and two ranks covering exactly the single-rank order."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.data.mixture import block_order, plan_mixture, rank_positions
from engine.data.pack import open_tokens
from engine.spec import MixtureSpec, SourceSpec, StageSpec
from tests.test_data_pack import data_tok, data_tok_dir, make_docs, prep, write_jsonl  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
# Disjoint vocabularies: every block can be attributed to its source from its tokens alone.
VOCABS = {"a": ("alpha", "beta", "gamma"), "b": ("river", "stone", "cloud"), "c": ("code", "data", "token")}


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory, data_tok, data_tok_dir):
    root = tmp_path_factory.mktemp("mix")
    cfg = {}
    for i, (name, words) in enumerate(VOCABS.items()):
        src = write_jsonl(root / f"{name}.jsonl", [d.split(": ", 1)[1] for d in make_docs(150 * (i + 1), seed=i, words=words)])
        out = root / name
        man = prep(SourceSpec(path=str(src), val_tokens=400), data_tok, out, data_tok_dir)
        cfg[name] = {"dir": str(out), "train_tokens": man["train"]["tokens"], "val_tokens": man["val"]["tokens"],
                     "domain": name}
    return {"sources": cfg}


def _stage_data(cfg, weights, tokens, seq_len=32, seed=5):
    from engine.train import StageData

    mix = MixtureSpec(weights=weights, tokens=tokens)
    stage = StageSpec(name="s", mixture=mix, seq_len=seq_len, global_batch_size=8)
    return StageData(cfg, stage, mix, seed)


def _source_of(block: np.ndarray, tok) -> str:
    text = tok.backend.decode(block.tolist())
    found = {n for n, ws in VOCABS.items() if any(w in text for w in ws)}
    assert len(found) == 1, (found, text)
    return found.pop()


def test_realised_mixture_within_1_percent_and_val_never_trained(three_sources, data_tok):
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    data = _stage_data(three_sources, weights, tokens=32 * 1000)
    blocks = data.batch(range(len(data))).numpy()
    seen = {n: 0 for n in weights}
    for b in blocks:
        seen[_source_of(b, data_tok)] += b.size
    total = sum(seen.values())
    for n, w in weights.items():
        assert abs(seen[n] / total - w) <= 0.01, (n, seen[n] / total, w)
    # Every 100-block stretch is close to the weights too (the order interleaves the sources).
    labels = data.labels[:100]
    assert abs(np.mean(labels == 0) - 0.5) < 0.15
    # Validation tokens: no training block contains a window of any validation stream.
    train_rows = {bytes(b.astype(np.uint16)) for b in blocks}
    for n, s in three_sources["sources"].items():
        val = np.asarray(open_tokens(s["dir"], "val")[:])
        for k in range(0, len(val) - 32, 7):
            assert bytes(val[k:k + 32].astype(np.uint16)) not in train_rows
    # and the train stream itself never contains the validation text
    for n, s in three_sources["sources"].items():
        val = np.asarray(open_tokens(s["dir"], "val")[:64]).tobytes()
        assert val not in np.asarray(open_tokens(s["dir"])[:]).tobytes()


def test_epochs_and_repetition_warnings():
    mix = MixtureSpec(weights={"big": 0.5, "small": 0.5}, tokens=100_000, max_repeats=4)
    p = plan_mixture(mix, {"big": 1_000_000, "small": 10_000}, seq_len=100)
    by = {s.name: s for s in p.sources}
    assert by["big"].epochs == pytest.approx(0.05) and by["small"].epochs == pytest.approx(5.0)
    assert any("small: repeats 5.0 times" in w for w in p.warnings) and not by["big"].warnings
    p = plan_mixture(mix, {"big": 1_000_000, "small": 50}, seq_len=100)
    assert any("cannot fill its share" in w for w in p.warnings)
    ep = plan_mixture(MixtureSpec(weights={"x": 1.0}, epochs=3), {"x": 10_000}, seq_len=100)
    assert ep.total_blocks == 300 and ep.sources[0].epochs == 3.0


_ORDER_SNIPPET = """
import sys, hashlib
sys.path.insert(0, {root!r})
from engine.data.mixture import block_order, plan_mixture
from engine.spec import MixtureSpec
mix = MixtureSpec(weights={{"a": 0.6, "b": 0.4}}, tokens=64 * 5000)
labels, idx = block_order(plan_mixture(mix, {{"a": 64 * 900, "b": 64 * 300}}, 64), seed=11)
print(hashlib.sha256(labels.tobytes() + idx.tobytes()).hexdigest())
"""


def test_order_is_deterministic_across_processes():
    mix = MixtureSpec(weights={"a": 0.6, "b": 0.4}, tokens=64 * 5000)
    labels, idx = block_order(plan_mixture(mix, {"a": 64 * 900, "b": 64 * 300}, 64), seed=11)
    here = hashlib.sha256(labels.tobytes() + idx.tobytes()).hexdigest()
    outs = {subprocess.run([sys.executable, "-c", _ORDER_SNIPPET.format(root=str(ROOT))], capture_output=True,
                           text=True, check=True).stdout.strip() for _ in range(2)}
    assert outs == {here}
    other, _ = block_order(plan_mixture(mix, {"a": 64 * 900, "b": 64 * 300}, 64), seed=12)
    assert not np.array_equal(other, labels)  # the seed matters
    # Within each epoch of a source, every block appears exactly once.
    a = idx[labels == 0]
    assert sorted(a[:900].tolist()) == list(range(900))


def test_resume_at_k_equals_uninterrupted_and_two_ranks_cover_the_order(three_sources):
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    gb, mb, steps = 8, 2, 12
    whole = _stage_data(three_sources, weights, tokens=32 * gb * steps)
    ref = whole.batch(range(gb * steps)).numpy()
    # "Resume": a new process state rebuilt from the same inputs, asked for positions from k on.
    for k in (0, 1, 37, gb * steps - 3):
        resumed = _stage_data(three_sources, weights, tokens=32 * gb * steps)
        assert np.array_equal(resumed.batch(range(k, gb * steps)).numpy(), ref[k:])
    # Two ranks (the trainer's slicing): disjoint, and together exactly the single-rank order.
    for world in (1, 2, 4):
        got = []
        for step in range(steps):
            per_step = [p for r in range(world) for rng in rank_positions(step, r, world, gb, mb) for p in rng]
            got += per_step
        assert got == list(range(gb * steps)), world
    r0 = [p for s in range(steps) for rng in rank_positions(s, 0, 2, gb, mb) for p in rng]
    r1 = [p for s in range(steps) for rng in rank_positions(s, 1, 2, gb, mb) for p in rng]
    assert not set(r0) & set(r1) and sorted(r0 + r1) == list(range(gb * steps))
    rows = np.concatenate([whole.batch(range(p, p + 1)).numpy() for p in sorted(r0 + r1)])
    assert np.array_equal(rows, ref)

