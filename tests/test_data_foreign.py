"""Already-tokenized sources (engine/data/foreign.py) on files written by their owner libraries
(tests/fixtures/foreign, see its README): the stream trained on is the written tokens in order, the
boundary index is the documents where the format keeps them, and val / max_tokens / mixture / epochs
behave as for text; tokenizer mismatches and corrupt files are exit 2 naming the file; and
`sample: shuffled` (engine/data/sample.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.data.mixture import block_order, plan_mixture
from engine.data.pack import Tokenizer, open_boundaries, open_tokens, prepare_source
from engine.data.sources import DataError
from engine.spec import MixtureSpec, SourceSpec
from tests.test_data_bad import tiny_model_dir
from tests.test_data_pack import data_tok, data_tok_dir  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
FX = ROOT / "tests" / "fixtures" / "foreign"
EXP = json.loads((FX / "expected.json").read_text())
EOS = EXP["eos_id"]
DOCS = EXP["documents"]

# fixture → (format, expected key, document order in the files or None when boundaries are not kept)
CASES = {
    "mds/mds-bytes": ("mds", "mds/mds-bytes"),
    "mds/mds-ndarray": ("mds", "mds/mds-ndarray"),
    "mds/mds-ndarray-zstd": ("mds", "mds/mds-ndarray-zstd"),
    "datatrove/tokenized": ("datatrove", "datatrove/tokenized"),
    "datatrove/merged": ("datatrove", "datatrove/merged"),
    "megatron/docs_text_document": ("megatron", "megatron/docs_text_document"),
    "megatron/docs_text_sentence": ("megatron", "megatron/docs_text_sentence"),
    "parquet/docs.parquet": ("tokens", "parquet/docs"),
    "parquet/grouped_64.parquet": ("tokens", "parquet/grouped_64"),
}


def _tok_dir(path: Path, eos_token: str = "<|endoftext|>") -> Path:
    from transformers import PreTrainedTokenizerFast
    if not (path / "tokenizer.json").exists():
        PreTrainedTokenizerFast(tokenizer_file=str(FX / "tokenizer.json"), eos_token=eos_token).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fx_tok_dir(tmp_path_factory) -> Path:
    return _tok_dir(tmp_path_factory.mktemp("fxtok") / "tok")


@pytest.fixture(scope="module")
def fx_tok(fx_tok_dir) -> Tokenizer:
    return Tokenizer(fx_tok_dir)


def _doc_order(key: str) -> list[int] | None:
    f = EXP["formats"][key]
    if key.startswith("datatrove"):
        return [i for p in sorted(f["per_file"]) for i in f["per_file"][p]["doc_order"]]
    if key.startswith("megatron") or key == "parquet/docs":
        return list(range(len(DOCS)))
    return None


def _prep(spec: SourceSpec, tok: Tokenizer, out: Path) -> dict:
    return prepare_source(spec, "src", tok, out, "fxtok")


@pytest.mark.parametrize("fixture", sorted(CASES))
def test_stream_is_the_written_tokens(fixture, fx_tok, tmp_path):
    fmt, key = CASES[fixture]
    man = _prep(SourceSpec(path=str(FX / fixture), format=fmt, keep_boundaries=True), fx_tok, tmp_path / "p")
    stream = np.asarray(open_tokens(tmp_path / "p")[:]).tolist()
    order = _doc_order(key)
    if key == "parquet/docs":  # rows hold no EOS: one EOS is appended per document, never a second
        assert stream == [t for d in DOCS for t in d + [EOS]]
        assert man["foreign"]["eos_appended"] == len(DOCS)
    else:
        assert stream == EXP["formats"][key]["stream"]
        assert man["foreign"]["eos_appended"] == 0
    assert man["foreign"]["boundaries_known"] == (order is not None)
    if order is not None:  # the boundary index is the documents, in the files' order
        starts = np.asarray(open_boundaries(tmp_path / "p")).tolist()
        lens = [len(DOCS[i]) + 1 for i in order]
        assert starts == np.concatenate([[0], np.cumsum(lens)[:-1]]).tolist()
    assert man["train"]["tokens"] == len(stream) and man["dtype"] == "uint16"


@pytest.mark.parametrize("fixture", ["datatrove/merged", "megatron/docs_text_sentence", "parquet/docs.parquet"])
def test_val_tokens_max_tokens_and_mixture_as_for_text(fixture, fx_tok, tmp_path):
    fmt, key = CASES[fixture]
    order = _doc_order(key)
    docs = [DOCS[i] + [EOS] for i in order]
    man = _prep(SourceSpec(path=str(FX / fixture), format=fmt, val_tokens=400, max_tokens=3000), fx_tok, tmp_path / "a")
    # Validation: whole documents from the start, the last cut at 400 (its remainder dropped, never trained on).
    val = np.asarray(open_tokens(tmp_path / "a", "val")[:]).tolist()
    flat = [t for d in docs for t in d]
    assert val == flat[:400]
    n_val_docs = int(np.searchsorted(np.cumsum([len(d) for d in docs]), 400, side="left")) + 1
    train = np.asarray(open_tokens(tmp_path / "a")[:]).tolist()
    assert train == [t for d in docs[n_val_docs:] for t in d][:3000]
    assert man["val"]["documents"] == n_val_docs and man["train"]["tokens"] == 3000
    # val_fraction: every 4th document.
    _prep(SourceSpec(path=str(FX / fixture), format=fmt, val_fraction=0.25), fx_tok, tmp_path / "f")
    assert np.asarray(open_tokens(tmp_path / "f", "val")[:]).tolist() == [t for d in docs[3::4] for t in d]
    # Mixture and epochs: blocks cut from the foreign stream like from a text one.
    mp = plan_mixture(MixtureSpec(weights={"src": 1.0}, epochs=2), {"src": 3000}, 64)
    assert mp.sources[0].blocks == 2 * (3000 // 64) and mp.sources[0].epochs == 2.0
    labels, idx = block_order(mp, seed=3)
    s = open_tokens(tmp_path / "a")
    seen = sorted(tuple(np.asarray(s[i * 64:(i + 1) * 64]).tolist()) for i in idx)
    want = sorted(tuple(train[i * 64:(i + 1) * 64]) for i in range(3000 // 64)) * 1
    assert seen == sorted(want * 2)


def test_content_cache_and_resume_key(fx_tok, tmp_path):
    spec = SourceSpec(path=str(FX / "megatron/docs_text_document"), format="megatron")
    a = _prep(spec, fx_tok, tmp_path / "p")
    b = _prep(spec, fx_tok, tmp_path / "p")
    assert a == b
    from engine.data.pack import spec_fingerprint
    assert spec_fingerprint(spec) != spec_fingerprint(spec.model_copy(update={"format": "megatron", "max_tokens": 10}))
    # New fields at their defaults do not change the key of an existing text source.
    t = SourceSpec(path=str(FX / "tokenizer.json"))
    d = t.model_dump(mode="json", exclude={"domain", "on_error", "tokenizer_check", "sample_by", "ids_field",
                                           "sample", "sample_seed"})
    assert set(d) == {"path", "format", "text_field", "max_tokens", "val_tokens", "val_fraction", "keep_boundaries"}


# --------------------------------------------------------------------------- tokenizer check


def _run_prepare(tmp_path: Path, tok_dir: Path, sources: dict, cache: Path, capsys) -> tuple[int, str]:
    from engine import prepare
    model = tmp_path / "model"
    if not model.exists():
        tiny_model_dir(model, tok_dir)
    srcs = "\n".join(f"  {n}: {json.dumps(s)}" for n, s in sources.items())
    weights = ", ".join(f"{n}: 1" for n in sources)
    run = tmp_path / "run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    (run / "preset.yaml").write_text(f"""name: foreign
model: {{path: {model}}}
tokenizer: {{path: {tok_dir}}}
sources:
{srcs}
stages:
  - name: s
    mixture: {{weights: {{{weights}}}, tokens: 2048}}
    seq_len: 64
    global_batch_size: 4
""")
    code = prepare.main([str(run), "--cache", str(cache)])
    return code, capsys.readouterr().err


def _snapshot(cache: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()) for p in (cache / "prepared").rglob("*")
            if p.is_file() and p.name != ".lock"}


def _corrupt(case: str, d: Path) -> tuple[dict, str]:
    """A damaged copy of a fixture: (source spec, the file the message must name)."""
    if case == "mds_truncated":
        shutil.copytree(FX / "mds/mds-ndarray", d / "mds")
        shard = d / "mds" / "shard.00001.mds"
        shard.write_bytes(shard.read_bytes()[:-100])
        return {"path": str(d / "mds"), "format": "mds"}, str(shard)
    if case == "mds_zstd_truncated":
        shutil.copytree(FX / "mds/mds-ndarray-zstd", d / "mds")
        shard = d / "mds" / "shard.00000.mds.zstd"
        shard.write_bytes(shard.read_bytes()[:-50])
        return {"path": str(d / "mds"), "format": "mds"}, str(shard)
    if case == "datatrove_truncated":
        shutil.copytree(FX / "datatrove/merged", d / "dt")
        f = d / "dt" / "001_docs.ds"
        f.write_bytes(f.read_bytes()[:-20])
        return {"path": str(d / "dt"), "format": "datatrove"}, str(f)
    if case == "megatron_truncated":
        for ext in (".bin", ".idx"):
            shutil.copy(FX / f"megatron/docs_text_document{ext}", d / f"m{ext}")
        (d / "m.bin").write_bytes((d / "m.bin").read_bytes()[:-10])
        return {"path": str(d / "m"), "format": "megatron"}, str(d / "m.bin")
    if case == "parquet_truncated":
        (d / "t.parquet").write_bytes((FX / "parquet/docs.parquet").read_bytes()[:5000])
        return {"path": str(d / "t.parquet"), "format": "tokens"}, str(d / "t.parquet")
    raise ValueError(case)


@pytest.mark.parametrize("case", ["mds_truncated", "mds_zstd_truncated", "datatrove_truncated", "megatron_truncated",
                                  "parquet_truncated"])
def test_corrupt_file_exit_2_names_it_and_prepared_data_untouched(case, fx_tok_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    good = {"path": str(FX / "datatrove/tokenized"), "format": "datatrove"}
    assert _run_prepare(tmp_path, fx_tok_dir, {"good": good}, cache, capsys)[0] == 0
    before = _snapshot(cache)
    spec, where = _corrupt(case, tmp_path)
    code, err = _run_prepare(tmp_path, fx_tok_dir, {"good": good, "bad": spec}, cache, capsys)
    assert code == 2, err
    assert where in err and ("truncated" in err or "corrupt" in err), err
    after = _snapshot(cache)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing prepared before is modified
    assert not any((cache / "prepared").glob("bad-*/manifest.json"))


def test_vocab_mismatch_exit_2_names_both_values(fx_tok_dir, tmp_path, capsys, data_tok_dir):
    # The data were written with the 1024-id fixture tokenizer; the preset's has 400 ids.
    cache = tmp_path / "cache"
    code, err = _run_prepare(tmp_path, data_tok_dir, {"m": {"path": str(FX / "megatron/docs_text_document"),
                                                            "format": "megatron"}}, cache, capsys)
    assert code == 2, err
    assert "docs_text_document" in err and "1023" in err and "400" in err, err
    assert not any((cache / "prepared").glob("m-*/manifest.json"))


def test_eos_mismatch_exit_2_and_warn_override(tmp_path, capsys):
    other = _tok_dir(tmp_path / "other-eos", eos_token="<|endoftext|>")
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    tok = json.loads((FX / "tokenizer.json").read_text())
    eos_text = next(k for k, v in tok["model"]["vocab"].items() if v == 5)
    cfg["eos_token"] = eos_text  # same vocabulary, another EOS id (5)
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    (other / "special_tokens_map.json").unlink(missing_ok=True)
    assert Tokenizer(other).eos_id == 5
    src = {"path": str(FX / "datatrove/merged"), "format": "datatrove"}
    code, err = _run_prepare(tmp_path, other, {"d": src}, tmp_path / "cache", capsys)
    assert code == 2, err
    assert "000_docs.ds" in err and "1023" in err and "EOS id is 5" in err, err
    code, err = _run_prepare(tmp_path, other, {"d": {**src, "tokenizer_check": "warn"}}, tmp_path / "cache", capsys)
    assert code == 0, err
    events = (tmp_path / "run" / "prepare" / "events.jsonl").read_text()
    assert "tokenizer_check: warn" in events


def test_datatrove_tokenizer_name_mismatch(fx_tok, tmp_path):
    shutil.copytree(FX / "datatrove/merged", tmp_path / "dt")
    for m in (tmp_path / "dt").glob("*.ds.metadata"):
        m.write_text("meta-llama/Meta-Llama-3-8B|2\n1\n1")
    with pytest.raises(DataError) as e:
        _prep(SourceSpec(path=str(tmp_path / "dt"), format="datatrove"), fx_tok, tmp_path / "p")
    assert "meta-llama/Meta-Llama-3-8B" in str(e.value) and fx_tok.name_or_path in str(e.value)
    assert "000_docs.ds.metadata" in str(e.value)


# --------------------------------------------------------------------------- sample: shuffled


def _kept_docs(out: Path) -> list[tuple]:
    s = np.asarray(open_tokens(out)[:])
    b = np.append(np.asarray(open_boundaries(out), dtype=np.int64), len(s))
    return [tuple(s[a:c].tolist()) for a, c in zip(b[:-1], b[1:])]


def test_sample_shuffled_deterministic_differs_from_first_meets_cap(fx_tok, tmp_path):
    def run(seed, sample, out):
        spec = SourceSpec(path=str(FX / "megatron/docs_text_document"), format="megatron", max_tokens=2000,
                          sample=sample, sample_seed=seed, keep_boundaries=True)
        man = _prep(spec, fx_tok, tmp_path / "cache" / out)
        return man, _kept_docs(tmp_path / "cache" / out)
    m1, a = run(7, "shuffled", "a")
    _, a2 = run(7, "shuffled", "a2")
    _, b = run(8, "shuffled", "b")
    _, f = run(0, "first", "f")
    assert a == a2 and a != b and a != f
    assert m1["train"]["tokens"] == 2000  # the cap, the last drawn document cut
    whole = {tuple(d + [EOS]) for d in DOCS}
    assert sum(d in whole for d in a) >= len(a) - 1  # whole documents but the cut one
    lens = np.array([len(d) + 1 for d in DOCS])
    from engine.data.sample import shuffled_take
    take = shuffled_take(lens, 2000, 7)
    assert take.sum() == 2000 and ((take == 0) | (take == lens)).sum() >= len(lens) - 1
    # Another process (another interpreter, same inputs) keeps the same documents.
    code = ("import numpy as np, json; from engine.data.sample import shuffled_take; "
            f"print(json.dumps(shuffled_take(np.array({lens.tolist()}), 2000, 7).tolist()))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(r.stdout) == take.tolist()


def test_sample_shuffled_needs_a_cap():
    with pytest.raises(ValueError, match="max_tokens"):
        SourceSpec(path="x", sample="shuffled")


def test_sample_shuffled_text_source(data_tok, data_tok_dir, tmp_path):
    from tests.test_data_pack import make_docs, write_jsonl
    src = write_jsonl(tmp_path / "d.jsonl", make_docs(300, seed=5))
    spec = SourceSpec(path=str(src), max_tokens=3000, sample="shuffled", sample_seed=1, val_tokens=200)
    fp = data_tok.fingerprint(data_tok_dir)
    man = prepare_source(spec, "t", data_tok, tmp_path / "c" / "t-x", fp)
    assert man["train"]["tokens"] == 3000 and man["sample"]["of_documents"] > man["sample"]["documents"]
    first = prepare_source(spec.model_copy(update={"sample": "first"}), "t", data_tok, tmp_path / "c" / "t-y", fp)
    assert np.asarray(open_tokens(tmp_path / "c" / "t-x")[:]).tolist() != np.asarray(open_tokens(tmp_path / "c" / "t-y")[:]).tolist()
    assert np.asarray(open_tokens(tmp_path / "c" / "t-x", "val")[:]).tolist() == \
        np.asarray(open_tokens(tmp_path / "c" / "t-y", "val")[:]).tolist()
    assert first["train"]["tokens"] == 3000


def test_token_jsonl_and_multi_row_group_parquet(fx_tok, tmp_path):
    # format: tokens also reads jsonl rows of ids; and a parquet file is read one row group at a time.
    with open(tmp_path / "t.jsonl", "w") as f:
        for d in DOCS:
            f.write(json.dumps({"ids": d}) + "\n")
    _prep(SourceSpec(path=str(tmp_path / "t.jsonl"), format="tokens", ids_field="ids"), fx_tok, tmp_path / "j")
    assert np.asarray(open_tokens(tmp_path / "j")[:]).tolist() == [t for d in DOCS for t in d + [EOS]]
    from engine.data.foreign import units
    us = units(SourceSpec(path=str(FX / "parquet/grouped_64.parquet"), format="tokens"))
    assert len(us) == 5 and all(not u.load()[2] for u in us)  # 5 row groups, all pre-grouped
    # progress: each row group covers its part of the file, and together the whole file
    assert all(u.nbytes > 0 for u in us) and sum(u.nbytes for u in us) == (FX / "parquet/grouped_64.parquet").stat().st_size
    from engine.data.foreign import ForeignReader
    from engine.data.sources import Counters
    reader = ForeignReader(SourceSpec(path=str(FX / "parquet/grouped_64.parquet"), format="tokens"), "src", fx_tok,
                           Counters())
    done = [meta["bytes"] for meta, _ in reader.batches()]  # bytes read after each batch (one per row group)
    assert len(done) == 5 and done == sorted(set(done)) and done[-1] == reader.total_bytes, done
    with pytest.raises(DataError, match="no column 'ids'"):
        units(SourceSpec(path=str(FX / "parquet/docs.parquet"), format="tokens", ids_field="ids"))


def test_token_jsonl_is_read_in_pieces_with_the_same_result(fx_tok, tmp_path, monkeypatch):
    """A large token jsonl is read a piece (the lines starting in a byte range) at a time: the stream,
    boundaries and validation split equal those of reading it whole, every line exactly once whatever
    the cut (blank lines included), and a bad line is named by its line number in the file."""
    from engine.data.foreign import units
    path = tmp_path / "t.jsonl"
    with open(path, "w") as f:
        for i, d in enumerate(DOCS * 3):
            f.write(json.dumps({"ids": d}) + "\n" + ("\n" if i % 7 == 3 else ""))
    spec = SourceSpec(path=str(path), format="tokens", ids_field="ids", keep_boundaries=True, val_tokens=300)
    whole = _prep(spec, fx_tok, tmp_path / "whole")
    for piece in (97, 1000, 4096):  # bytes: cuts inside lines, at many places
        monkeypatch.setenv("CPT_TOKENS_JSONL_PIECE", str(piece))
        assert len(units(spec)) == -(-path.stat().st_size // piece)
        cut = _prep(spec, fx_tok, tmp_path / f"cut-{piece}")
        for split in ("train", "val"):
            assert np.asarray(open_tokens(tmp_path / f"cut-{piece}", split)[:]).tolist() == \
                np.asarray(open_tokens(tmp_path / "whole", split)[:]).tolist()
        assert np.asarray(open_boundaries(tmp_path / f"cut-{piece}")).tolist() == \
            np.asarray(open_boundaries(tmp_path / "whole")).tolist()
        assert (cut["documents"], cut["train"], cut["foreign"]) == (whole["documents"], whole["train"], whole["foreign"])
    lines = path.read_text().splitlines(keepends=True)
    lines[40] = '{"ids": "not a list"}\n' if lines[40].strip() else lines[40]
    path.write_text("".join(lines))
    monkeypatch.setenv("CPT_TOKENS_JSONL_PIECE", "500")
    with pytest.raises(DataError, match=f"t.jsonl:41: "):
        _prep(spec, fx_tok, tmp_path / "bad")


_KILL_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from engine.data.pack import Tokenizer, prepare_source
from engine.spec import SourceSpec
prepare_source(SourceSpec(path={src!r}, format="tokens", val_tokens=300, keep_boundaries=True), "src",
               Tokenizer({tok!r}), Path({out!r}), "fxtok")
"""


def test_kill_9_then_rerun_gives_identical_bytes(fx_tok, fx_tok_dir, tmp_path, monkeypatch):
    import os
    import signal
    src = str(FX / "parquet/docs.parquet")  # 3 row groups, EOS appended by the reader: state that must survive
    env = {**os.environ, "CPT_PREP_COMMIT_S": "0", "CPT_FOREIGN_BATCH_TOKENS": "400", "CPT_SHARD_TOKENS": "1024"}
    code = _KILL_SCRIPT.format(root=str(ROOT), src=src, tok=str(fx_tok_dir), out=str(tmp_path / "killed"))
    r = subprocess.run([sys.executable, "-c", code], env={**env, "CPT_FAULT_PREP_KILL_AFTER": "2500"})
    assert r.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "manifest.json").exists()
    r = subprocess.run([sys.executable, "-c", code], env=env)
    assert r.returncode == 0
    monkeypatch.setenv("CPT_SHARD_TOKENS", "1024")
    monkeypatch.setenv("CPT_FOREIGN_BATCH_TOKENS", "400")
    prepare_source(SourceSpec(path=src, format="tokens", val_tokens=300, keep_boundaries=True), "src", fx_tok,
                   tmp_path / "whole", "fxtok")
    a, b = tmp_path / "killed", tmp_path / "whole"
    names = sorted(p.name for p in b.iterdir() if p.name != ".lock")
    assert sorted(p.name for p in a.iterdir() if p.name != ".lock") == names and len(names) > 4
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
