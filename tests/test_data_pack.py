"""Data preparation: exact packing, validation split, max_tokens, boundary index, content cache,
resumability (kill -9 → identical bytes) and sources of every format.

Shared fixtures (a small BPE tokenizer, a corpus writer) live here; the other test_data_* modules
import them.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.data.pack import Tokenizer, open_boundaries, open_tokens, prepare_source
from engine.spec import SourceSpec

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud "
         "light night code data token model train learn value index print return yield").split()


def make_docs(n: int, seed: int = 0, words: tuple = WORDS, min_words: int = 3, max_words: int = 60) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"doc {seed}-{i}: " + " ".join(rng.choice(words, rng.integers(min_words, max_words)))
            for i in range(n)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({field: d, "meta": 1}) + "\n")
    return path


@pytest.fixture(scope="session")
def data_tok_dir(shared_cache) -> Path:
    """A small byte-level BPE (trained once per session, ~1 s) with BOS/EOS tokens."""
    from engine.tokenizer import train_bpe

    out = shared_cache / "data-test-tokenizer"
    if not (out / "tokenizer.json").exists():
        texts = make_docs(400, seed=99) + ["def f(x):\n    return x + 1\n"] * 20
        train_bpe(texts, 400, out, 10 ** 7)
    return out


@pytest.fixture(scope="session")
def data_tok(data_tok_dir) -> Tokenizer:
    return Tokenizer(data_tok_dir)


def prep(spec: SourceSpec, tok: Tokenizer, out: Path, tok_dir: Path, **kw) -> dict:
    return prepare_source(spec, "src", tok, out, tok.fingerprint(tok_dir), **kw)


def split_docs(stream: np.ndarray, eos: int) -> list[np.ndarray]:
    ends = np.flatnonzero(stream == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [stream[s:e] for s, e in zip(starts, ends)]


def decode_docs(tok: Tokenizer, stream) -> list[str]:
    arr = np.asarray(stream[:], dtype=np.int64)
    pieces = split_docs(arr, tok.eos_id)
    if tok.bos_id is not None:
        assert all(p[0] == tok.bos_id for p in pieces)
        pieces = [p[1:] for p in pieces]
    return [tok.backend.decode(p.tolist(), skip_special_tokens=False) for p in pieces]


# --------------------------------------------------------------------------- packing is exact

_text = st.text(alphabet=st.sampled_from(list("abcdef xyz.\n\u00e9\u4e2d")), min_size=0, max_size=40)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=st.lists(_text, min_size=1, max_size=30), shard=st.integers(3, 64), seq_len=st.integers(2, 32),
       bos=st.booleans())
def test_packing_is_exact(docs, shard, seq_len, bos, data_tok_dir, monkeypatch):
    """Decoding the shards gives back every kept document, in order, each followed by EOS; the blocks
    of any seq_len are exactly the stream cut in order (nothing lost, nothing duplicated)."""
    monkeypatch.setenv("CPT_SHARD_TOKENS", str(shard))
    monkeypatch.setattr("engine.data.pack.BATCH_DOCS", 3)  # several encode batches: offsets carried across them
    tok = Tokenizer(data_tok_dir, add_bos=bos)
    kept = [d for d in docs if d.strip()]
    with tempfile.TemporaryDirectory() as d:
        src = write_jsonl(Path(d) / "in.jsonl", docs)
        spec = SourceSpec(path=str(src), keep_boundaries=True)
        if not kept:
            with pytest.raises(Exception, match="no training tokens"):
                prep(spec, tok, Path(d) / "out", data_tok_dir)
            return
        man = prep(spec, tok, Path(d) / "out", data_tok_dir)
        stream = open_tokens(Path(d) / "out")
        expect, starts = [], []
        for doc in kept:
            starts.append(len(expect))
            expect += ([tok.bos_id] if bos else []) + tok.backend.encode(doc, add_special_tokens=False).ids + [tok.eos_id]
        assert np.asarray(stream[:]).tolist() == expect
        assert decode_docs(tok, stream) == kept
        assert man["train"]["tokens"] == len(expect) and man["skipped"].get("empty document", 0) == len(docs) - len(kept)
        assert all(s["tokens"] == shard for s in man["train"]["shards"][:-1])
        # Boundary index: each training document starts where the index says.
        b = np.asarray(open_boundaries(Path(d) / "out"))
        lens = np.diff(np.append(b, len(expect)))
        assert b.tolist() == starts  # exactly the start offset of every training document
        assert len(b) == len(kept) and all(expect[int(s) + int(n) - 1] == tok.eos_id for s, n in zip(b, lens))
        # Blocks of seq_len: the stream cut in order, across shard boundaries.
        n = len(stream) // seq_len
        blocks = [np.asarray(stream[k * seq_len:(k + 1) * seq_len]) for k in range(n)]
        assert (np.concatenate(blocks).tolist() if blocks else []) == expect[: n * seq_len]


def test_tokenizer_loaded_from_its_cache_is_the_same(tmp_path, data_tok_dir, monkeypatch):
    """The second load of a tokenizer directory comes from ~/.cache/cpt-tui (no transformers): the same
    backend JSON, ids, BOS/EOS conventions and dtype; a changed file is a new key (loaded again)."""
    import shutil

    from engine.data.pack import _tokenizer_key
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    d = tmp_path / "tok"
    shutil.copytree(data_tok_dir, d)
    first, second = Tokenizer(d), Tokenizer(d)
    assert first._backend_json is None and second._backend_json is not None  # through transformers, then cached
    for a, b in ((first, second), (Tokenizer(d, add_bos=True), Tokenizer(d, add_bos=True))):
        assert (a.eos_id, a.bos_id, a.vocab_size, a.dtype, a.fingerprint(d)) == \
            (b.eos_id, b.bos_id, b.vocab_size, b.dtype, b.fingerprint(d))
        assert a.encoder_args() == b.encoder_args()
        assert a.backend.encode("doc 1: alpha beta\n").ids == b.backend.encode("doc 1: alpha beta\n").ids
    key = _tokenizer_key(d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 77}))
    assert _tokenizer_key(d) != key and Tokenizer(d)._backend_json is None


def test_val_split_max_tokens_and_no_leak(tmp_path, data_tok, data_tok_dir):
    docs = make_docs(300, seed=1)
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    man = prep(SourceSpec(path=str(src), val_tokens=500, max_tokens=4000), data_tok, tmp_path / "a", data_tok_dir)
    assert man["val"]["tokens"] == 500 and man["train"]["tokens"] == 4000
    val_docs = decode_docs(data_tok, open_tokens(tmp_path / "a", "val")[:499])  # last val doc is cut at 500
    train = open_tokens(tmp_path / "a", "train")
    train_docs = decode_docs(data_tok, train)
    assert val_docs and set(val_docs).isdisjoint(train_docs)  # no document is in both splits
    first_train = docs.index(train_docs[0])
    assert docs[:len(val_docs)] == val_docs and first_train == man["val"]["documents"]
    assert train_docs == docs[first_train:first_train + len(train_docs)]
    # val_fraction: every 5th document is held out, whole.
    man = prep(SourceSpec(path=str(src), val_fraction=0.2), data_tok, tmp_path / "b", data_tok_dir)
    v, t = decode_docs(data_tok, open_tokens(tmp_path / "b", "val")), decode_docs(data_tok, open_tokens(tmp_path / "b"))
    assert v == docs[4::5] and t == [d for i, d in enumerate(docs) if i % 5 != 4]


def test_content_cache_and_changed_input(tmp_path, data_tok, data_tok_dir, shared_cache):
    from engine.data.pack import prepared_dir

    src = write_jsonl(tmp_path / "in.jsonl", make_docs(50, seed=2))
    spec = SourceSpec(path=str(src))
    fp = data_tok.fingerprint(data_tok_dir)
    out = prepared_dir(tmp_path / "cache", "s", spec, fp)
    man = prepare_source(spec, "s", data_tok, out, fp)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    calls = []
    assert prepare_source(spec, "s", data_tok, out, fp, progress=calls.append) == man  # nothing to do
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes and not calls
    time.sleep(1.1)  # mtime granularity of the fingerprint is one second
    write_jsonl(src, make_docs(60, seed=2))
    assert prepared_dir(tmp_path / "cache", "s", spec, fp) != out  # new content → new directory


def test_formats_dirs_globs_compressed_parquet_text_hf(tmp_path, data_tok, data_tok_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from datasets import Dataset

    docs = make_docs(30, seed=3)
    d = tmp_path / "corpus"
    write_jsonl(d / "a.jsonl", docs[:10])
    write_jsonl(d / "sub" / "b.jsonl.gz", docs[10:20])
    raw = "".join(json.dumps({"body": x}) + "\n" for x in docs[20:30]).encode()
    (d / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))

    def one(spec, n):
        prep(spec, data_tok, tmp_path / n, data_tok_dir)
        return decode_docs(data_tok, open_tokens(tmp_path / n))

    # c.jsonl.zst has its text under another key: skipped in the glob, read as its own source.
    assert one(SourceSpec(path=str(d / "**" / "*.jsonl*"), on_error="skip"), "glob")[:20] == docs[:20]
    assert one(SourceSpec(path=str(d / "c.jsonl.zst"), text_field="body"), "zst") == docs[20:30]
    pq.write_table(pa.table({"text": docs[:15]}), tmp_path / "p.parquet", row_group_size=4)
    assert one(SourceSpec(path=str(tmp_path / "p.parquet")), "pq") == docs[:15]
    (tmp_path / "txt").mkdir()
    for i, x in enumerate(docs[:3]):
        (tmp_path / "txt" / f"{i}.txt").write_text(x)
    assert one(SourceSpec(path=str(tmp_path / "txt")), "txt") == docs[:3]
    (tmp_path / "lines.txt").write_text("\n".join(docs[3:6]) + "\n\n\n" + "\n\n \n".join(docs[6:9]) + "\n")
    assert one(SourceSpec(path=str(tmp_path / "lines.txt"), sample_by="line"), "by-line") == docs[3:9]
    assert one(SourceSpec(path=str(tmp_path / "lines.txt"), sample_by="paragraph"), "by-par") == [
        "\n".join(docs[3:6]), *docs[6:9]]
    Dataset.from_dict({"text": docs[:12]}).save_to_disk(str(tmp_path / "hfds"))
    assert one(SourceSpec(path=str(tmp_path / "hfds")), "hf") == docs[:12]


# --------------------------------------------------------------------------- resumable


_PREP_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
import engine.data.pack as pack
from engine.data.pack import Tokenizer, prepare_source
from engine.spec import SourceSpec
_batches, read = pack._batches, [0]
def counting(reader, after):  # how many documents this run reads and encodes (independent of timing)
    for meta, texts in _batches(reader, after):
        read[0] += len(texts)
        yield meta, texts
pack._batches = counting
tok = Tokenizer({tok!r})
spec = SourceSpec(path={src!r}, val_tokens=3000, keep_boundaries=True)
prepare_source(spec, "src", tok, Path({out!r}), tok.fingerprint({tok!r}),
               progress=lambda p: print("PROGRESS", p["bytes_this_run"], p["total_bytes"], flush=True))
print("READ", read[0], flush=True)
print("DONE", flush=True)
"""


def _run_prep(src, out, tok_dir, env) -> subprocess.Popen:
    code = _PREP_SCRIPT.format(root=str(ROOT), tok=str(tok_dir), src=str(src), out=str(out))
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)


def test_kill_9_then_rerun_gives_identical_bytes(tmp_path, data_tok_dir, monkeypatch):
    docs = make_docs(5000, seed=4, min_words=20, max_words=120)
    src = write_jsonl(tmp_path / "big.jsonl", docs)  # ~2 MB
    env = {**os.environ, "CPT_SHARD_TOKENS": "65536", "CPT_PREP_COMMIT_S": "0", "TOKENIZERS_PARALLELISM": "false"}
    # The killed run uses 2 worker processes, the resumed one none: the bytes must not depend on it.
    # The preparation SIGKILLs itself right after the first commit past 100k tokens: a real kill -9
    # at a point that does not depend on how fast this machine is.
    p = _run_prep(src, tmp_path / "killed", data_tok_dir,
                  {**env, "CPT_PREP_WORKERS": "2", "CPT_FAULT_PREP_KILL_AFTER": "100000"})
    p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL
    prog = tmp_path / "killed" / "progress.json"
    assert not (tmp_path / "killed" / "manifest.json").exists()  # nothing half-done is complete
    state = json.loads(prog.read_text())["state"]
    committed, committed_docs = state["bytes"], state["counters"]["docs"]
    assert 0 < committed_docs < len(docs)
    r = _run_prep(src, tmp_path / "killed", data_tok_dir, {**env, "CPT_PREP_WORKERS": "1"})
    out, _ = r.communicate(timeout=300)
    assert r.returncode == 0 and "DONE" in out
    # The rerun continued from the commit: it read exactly the documents after it, not the whole input.
    reread = int(next(l.split()[1] for l in out.splitlines() if l.startswith("READ")))
    assert reread == len(docs) - committed_docs, (reread, committed_docs)
    first = [l.split() for l in out.splitlines() if l.startswith("PROGRESS")]
    if first:
        assert int(first[-1][1]) <= int(first[-1][2]) - committed + 1
    monkeypatch.setenv("CPT_SHARD_TOKENS", env["CPT_SHARD_TOKENS"])
    tok = Tokenizer(data_tok_dir)
    prepare_source(SourceSpec(path=str(src), val_tokens=3000, keep_boundaries=True), "src", tok, tmp_path / "whole",
                   tok.fingerprint(data_tok_dir))
    a, b = tmp_path / "killed", tmp_path / "whole"
    names = sorted(p.name for p in b.iterdir() if p.name != ".lock")
    assert sorted(p.name for p in a.iterdir() if p.name != ".lock") == names and len(names) > 4
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
