"""Long-document upsampling per stage (engine/data/longdocs.py, Gao et al.): within each source the
tokens of documents >= min_tokens make up `share`, the source weights stay as they were, the plan
reports available / realised shares and warns past max_repeats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.data.longdocs import SegmentStream, plan_view
from engine.data.mixture import plan_mixture
from engine.data.pack import open_boundaries, open_tokens
from engine.data.sources import DataError
from engine.spec import parse_preset
from tests.test_data_bad import tiny_model_dir
from tests.test_data_foreign import FX, fx_tok, fx_tok_dir  # noqa: F401  (fixtures)


def _long_share_of(seg: np.ndarray, lengths: np.ndarray, min_tokens: int) -> float:
    """Share of a view's tokens that lie in long documents, counted from the segments themselves."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    ends = starts + lengths
    long_tok = 0
    for a, b in seg:
        i = int(np.searchsorted(ends, a, side="right"))
        while a < b:  # a segment may span several documents
            e = min(b, int(ends[i]))
            if lengths[i] >= min_tokens:
                long_tok += e - a
            a, i = e, i + 1
    return long_tok / int((seg[:, 1] - seg[:, 0]).sum())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10 ** 6), n=st.integers(20, 400), share=st.floats(0.05, 0.9),
       min_tokens=st.sampled_from([64, 512, 4096]), long_frac=st.floats(0.01, 0.5))
def test_realised_share_within_1pct_and_weight_unchanged(seed, n, share, min_tokens, long_frac):
    rng = np.random.default_rng(seed)
    is_long = rng.random(n) < long_frac
    is_long[0] = True
    is_long[-1] = False
    lengths = np.where(is_long, rng.integers(min_tokens, 4 * min_tokens + 1, n),
                       rng.integers(1, min_tokens, n)).astype(np.int64)
    v = plan_view(lengths, min_tokens, share, seed)
    seg, rep = v["segments"], v["report"]
    assert abs(rep["realised_share"] - share) <= 0.01
    assert abs(_long_share_of(seg, lengths, min_tokens) - share) <= 0.01  # counted independently
    assert abs(rep["tokens"] - lengths.sum()) <= 0.01 * lengths.sum()  # the source keeps its size: weight unchanged
    assert rep["available_share"] == pytest.approx(lengths[lengths >= min_tokens].sum() / lengths.sum())
    # Deterministic.
    assert np.array_equal(plan_view(lengths, min_tokens, share, seed)["segments"], seg)


def _write_token_parquet(path: Path, lengths: list[int], seed: int) -> list[list[int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 1023, n).tolist() + [1023] for n in lengths]
    pq.write_table(pa.table({"input_ids": pa.array(docs, type=pa.list_(pa.int32()))}), path, row_group_size=50)
    return docs


PRESET = """\
name: longdocs
model: {{path: {model}}}
tokenizer: {{path: {tok}}}
sources:
  a: {{path: {a}, format: tokens}}
  b: {{path: {b}, format: tokens}}
stages:
  - name: short
    mixture: {{weights: {{a: 0.7, b: 0.3}}, tokens: 8192}}
    seq_len: 64
    global_batch_size: 4
  - name: long
    kind: context_extension
    mixture: {{weights: {{a: 0.7, b: 0.3}}, epochs: 1}}
    long_docs: {{min_tokens: 300, share: {share}}}
    seq_len: 256
    global_batch_size: 2
"""


def _prepare(tmp_path: Path, tok_dir: Path, share: float):
    from engine.data.run import prepare_data
    rng = np.random.default_rng(0)
    la = [int(x) for x in np.where(rng.random(300) < 0.03, rng.integers(300, 600, 300), rng.integers(5, 200, 300))]
    lb = [int(x) for x in np.where(rng.random(200) < 0.08, rng.integers(300, 600, 200), rng.integers(5, 100, 200))]
    _write_token_parquet(tmp_path / "a.parquet", la, 1)
    _write_token_parquet(tmp_path / "b.parquet", lb, 2)
    model = tmp_path / "model"
    if not model.exists():
        tiny_model_dir(model, tok_dir)
    preset = parse_preset(PRESET.format(model=model, tok=tok_dir, a=tmp_path / "a.parquet", b=tmp_path / "b.parquet",
                                        share=share))
    events = []
    prepared = prepare_data(preset, tok_dir, model, tmp_path / "cache", lambda typ, **kw: events.append((typ, kw)))
    return preset, prepared, events, {"a": np.array(la) + 1, "b": np.array(lb) + 1}


def test_stage_trains_on_views_with_the_share(fx_tok_dir, tmp_path):
    from engine.plan import stage_config
    preset, prepared, events, lengths = _prepare(tmp_path, fx_tok_dir, 0.3)
    # keep_boundaries is implied by long_docs: the base sources have their boundary index.
    for n in "ab":
        assert open_boundaries(prepared["sources"][n]["dir"]) is not None
    cfg_short = stage_config(preset, 0, tmp_path / "run", {**prepared, "tokenizer_dir": "t", "model_dir": "m"})
    cfg_long = stage_config(preset, 1, tmp_path / "run", {**prepared, "tokenizer_dir": "t", "model_dir": "m"})
    assert cfg_short["sources"] == prepared["sources"]
    base_tokens, view_tokens = {}, {}
    for n in "ab":
        src = cfg_long["sources"][n]
        assert src["dir"] != prepared["sources"][n]["dir"] and ".long-" in src["dir"]
        view = open_tokens(src["dir"], "train")
        assert isinstance(view, SegmentStream) and len(view) == src["train_tokens"]
        # The view's tokens are segments of the base stream, in order.
        base = np.asarray(open_tokens(prepared["sources"][n]["dir"], "train")[:])
        seg = np.load(Path(src["dir"]) / "segments.npy")
        assert np.array_equal(np.asarray(view[:]), np.concatenate([base[a:b] for a, b in seg]))
        assert np.array_equal(np.asarray(view[100:700]), np.asarray(view[:])[100:700])  # slices across segments
        # Realised share within 1%, counted from the data.
        assert abs(_long_share_of(seg, lengths[n], 300) - 0.3) <= 0.01
        r = prepared["long_docs"]["long"][n]
        L = lengths[n][lengths[n] >= 300].sum()
        assert abs(r["realised_share"] - 0.3) <= 0.01 and r["available_share"] == pytest.approx(L / lengths[n].sum())
        # a (13% long) is upsampled; b (37% long) keeps fewer long tokens and repeats its short documents.
        assert (r["long_repeats"] > 1) == (r["available_share"] < 0.3) == (n == "a")
        # Validation is the base source's.
        assert np.array_equal(np.asarray(open_tokens(src["dir"], "val")[:]),
                              np.asarray(open_tokens(prepared["sources"][n]["dir"], "val")[:]))
        base_tokens[n], view_tokens[n] = prepared["sources"][n]["train_tokens"], src["train_tokens"]
    # Source weights unchanged within 1%: the same token shares with and without long_docs.
    mix = preset.mixture_of(preset.stages[1])
    pb, pv = plan_mixture(mix, base_tokens, 256), plan_mixture(mix, view_tokens, 256)
    for sb, sv in zip(pb.sources, pv.sources):
        assert abs(sb.blocks / pb.total_blocks - sv.blocks / pv.total_blocks) <= 0.01
    msgs = [kw.get("message", "") for k, kw in events]
    assert any("long/a: long documents" in m and "realised" in m for m in msgs), msgs


def test_warns_when_share_needs_more_repeats_than_max(fx_tok_dir, tmp_path):
    _, prepared, events, _ = _prepare(tmp_path, fx_tok_dir, 0.9)
    warns = [kw["message"] for k, kw in events if k == "warning"]
    assert any("long/a" in w and "max_repeats" in w for w in warns), warns


def test_long_docs_needs_boundaries(fx_tok, tmp_path):
    from engine.data.longdocs import build_view
    from engine.data.pack import prepare_source
    from engine.spec import SourceSpec
    prepare_source(SourceSpec(path=str(FX / "mds/mds-ndarray"), format="mds", keep_boundaries=True), "m", fx_tok,
                   tmp_path / "m", "fp")
    with pytest.raises(DataError, match="long_docs needs document boundaries"):
        build_view(tmp_path / "m", 100, 0.3, 0)


def test_plan_reports_shares_from_the_cache(fx_tok_dir, tmp_path):
    from engine.data.run import cached_long_docs
    from engine.plan import format_plan, resolve
    preset, prepared, _, _ = _prepare(tmp_path, fx_tok_dir, 0.3)
    ld = cached_long_docs(preset, tmp_path / "cache")
    for n in "ab":
        assert ld["long"][n]["available_share"] == pytest.approx(prepared["long_docs"]["long"][n]["available_share"])
        assert ld["long"][n]["realised_share"] == pytest.approx(prepared["long_docs"]["long"][n]["realised_share"])
    text = format_plan(resolve(preset, {n: s["train_tokens"] for n, s in prepared["sources"].items()}, long_docs=ld))
    assert "a: long-document share" in text and "realised" in text, text
