"""The tiktoken path of preparation's tokenization (engine.data.tiktoken_bpe) gives exactly the Rust
tokenizer's ids, document by document, for GPT-2 style, Llama 3 / Qwen 2 style (Split + ByteLevel,
NFC), gap-leaving and production-size (≥ 100k) byte-level BPE tokenizers; documents it cannot vouch
for (added tokens, characters outside its probed set: unassigned, private use, lone surrogates) go to
the Rust tokenizer;
a wrong rank table or a disagreeing regex is caught at start-up; unsupported tokenizers (and
patterns that leave gaps) get no fast path; the shards are byte-identical with the path on and off."""

from __future__ import annotations

import glob
import json
import sysconfig

import numpy as np
import pytest
from tokenizers import Tokenizer

from engine.data.tiktoken_bpe import TiktokenBPE, derive, verify
from engine.data.tokenize import Encoder, fast_path_ok
from tests.test_data_pack import data_tok_dir, make_docs, write_jsonl  # noqa: F401  (fixture)

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

TEXTS = [
    "Hello, world! It's John's book; they'RE here, we'VE gone, I'M ok, he'LL go, she'D say.",
    "numbers 1 12 123 1234 12345678901234 3.14159 -42 1e10 ①②③ ٣٤٥ १२३",
    "  leading spaces\ttabs\t\tand\r\nwindows\r\n\r\nlines   trailing   \n\n\n",
    "café naïve Ångström façade Œuvre ß ſ ǅ ǈ İstanbul ΑΒΓ αβγ ώ привет мир Ёж",
    "中文字符测试，标点。日本語のテキスト、カタカナ ひらがな。한국어 문장입니다.",
    "emoji 😀👍🏽 astral 𝔘𝔫𝔦 and combining e\u0301 a\u0308 and NBSP\u00a0here\u2003em\u2009thin",
    "control \x0b\x0c\x1c\x1d\x1e\x1f\x85\u2028\u2029 chars and zero\u200bwidth\u200djoiner",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tif x != 0: pass\n",
    "special <|end_of_text|> inside and <|begin_of_text|> again <|pad|>",
    "Armenian \u0558\u0559 new letters \ua7ce\ua7cf and \u0c5c",
    "decomposed cafe\u0301 Ange\u0301lique and composed café (NFC matters)",
    "x", " ", "\n", "''''", "'s", " 's", "a'", "...!!!???", "\u00a0\u00a0", "e\u0301",
    "a" * 5000, " " * 300 + "x", "ab3$" * 500,
] + make_docs(50, seed=3)

ASCII_TEXT, CJK_TEXT, ADDED_TEXT, EMOJI_TEXT = TEXTS[0], TEXTS[4], TEXTS[8], TEXTS[5]
PRIVATE_TEXT = "private use \ue000 and unassigned \u0378 characters"


def _with(spec_json: str, pre: dict, normalizer=None) -> str:
    spec = json.loads(spec_json)
    spec["pre_tokenizer"], spec["normalizer"] = pre, normalizer
    return json.dumps(spec)


def _split(pattern: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


@pytest.fixture(scope="session")
def big_tok_json(shared_cache) -> str:
    """A production-size byte-level BPE (100,352 tokens, GPT-2 pre-tokenizer), trained once per
    session (~20 s) on 30 MB of the Python sources installed here: real text nobody here wrote."""
    path = shared_cache / "big-bpe" / "tokenizer.json"
    if not path.exists():
        from tokenizers import decoders, models, pre_tokenizers, trainers

        paths = sysconfig.get_paths()
        files = sorted(glob.glob(paths["stdlib"] + "/**/*.py", recursive=True)) + \
            sorted(glob.glob(paths["purelib"] + "/**/*.py", recursive=True))
        texts, n = [], 0
        for f in files:
            try:
                with open(f, encoding="utf-8") as fh:
                    texts.append(fh.read())
            except (OSError, UnicodeDecodeError):
                continue
            n += len(texts[-1])
            if n > 30_000_000:
                break
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
            vocab_size=100_352, min_frequency=1, show_progress=False,
            special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    return path.read_text()


def _variants(small: str, big: str) -> dict[str, str]:
    return {"gpt2": small, "llama3": _with(small, _split(LLAMA3_PATTERN)),
            "qwen2-nfc": _with(small, _split(LLAMA3_PATTERN), {"type": "NFC"}),
            "big-100k": big, "big-100k-llama3-nfc": _with(big, _split(LLAMA3_PATTERN), {"type": "NFC"})}


@pytest.mark.parametrize("variant", ["gpt2", "llama3", "qwen2-nfc", "big-100k", "big-100k-llama3-nfc"])
def test_tiktoken_ids_equal_the_tokenizers(variant, data_tok_dir, big_tok_json):
    # the start-up check runs once per tokenizer in the session (its verdict is kept in the
    # session's XDG_CACHE_HOME, see conftest.py)
    js = _variants((data_tok_dir / "tokenizer.json").read_text(), big_tok_json)[variant]
    tok = Tokenizer.from_str(js)
    if variant.startswith("big"):
        assert tok.get_vocab_size() >= 100_000
    fast, why = TiktokenBPE.build(tok, js)
    assert fast is not None, why
    from engine.data.tiktoken_bpe import _cache_file
    assert _cache_file().exists()
    taken = 0
    for t in TEXTS + [t * 3 for t in TEXTS]:
        got = fast.ids(t)
        ref = tok.encode(t, add_special_tokens=False).ids
        assert got is None or got.tolist() == ref, repr(t)
        taken += got is not None
    assert taken > len(TEXTS)
    # the path takes ordinary text, and leaves added tokens and unsafe characters to Rust
    for t in (ASCII_TEXT, CJK_TEXT, EMOJI_TEXT):
        assert fast.ids(t) is not None
    assert fast.ids(ADDED_TEXT) is None and fast.ids(PRIVATE_TEXT) is None and fast.ids("lone \ud800") is None
    # whole batches through the Encoder: same flat tokens and lengths as without the fast path
    args = (js, 0, 1, "uint32" if variant.startswith("big") else "uint16")
    a, b = Encoder(*args, fast=True), Encoder(*args)
    assert a.fast is not None
    batch = TEXTS + ["lone \ud800 surrogate"] + make_docs(20, seed=5)
    (fa, la, ba), (fb, lb, bb) = a(batch), b(batch)
    assert fa.dtype == fb.dtype and np.array_equal(fa, fb) and np.array_equal(la, lb) and ba == bb == [len(TEXTS)]


def test_a_wrong_rank_table_is_caught_at_start_up(big_tok_json, data_tok_dir):
    for js in (big_tok_json, (data_tok_dir / "tokenizer.json").read_text()):
        tok = Tokenizer.from_str(js)
        d, why = derive(json.loads(js))
        assert d is not None, why
        if len(d.ranks) < 1000:  # (the right table of the big one passes in the test above)
            assert verify(tok, TiktokenBPE(d))[0] == ""
        # swap the ranks of two frequent multi-byte tokens (" the"/" in" in the big one)
        multi = sorted((i, b) for b, i in d.ranks.items() if len(b) > 1)
        (i, x), (j, y) = multi[0], multi[1]
        d.ranks[x], d.ranks[y] = j, i
        assert verify(tok, TiktokenBPE(d))[0] != ""
    # ids that do not follow merge order: refused before any encoding
    spec = json.loads((data_tok_dir / "tokenizer.json").read_text())
    merges = spec["model"]["merges"]
    m0, m9 = ("".join(m.split(" ")) if isinstance(m, str) else "".join(m) for m in (merges[0], merges[9]))
    v = spec["model"]["vocab"]
    v[m0], v[m9] = v[m9], v[m0]
    d, why = derive(spec)
    assert d is None and "merge order" in why


def test_a_regex_the_two_engines_read_differently_is_caught(data_tok_dir):
    """`\\p{N}{1,3}+` is possessive for tiktoken's fancy-regex, a repeated group for Oniguruma
    ("1234" is one piece there, two here): the start-up check finds it and refuses the path."""
    js = _with((data_tok_dir / "tokenizer.json").read_text(), _split(r"\p{L}+|\p{N}{1,3}+|\s+|[^\s\p{L}\p{N}]+"))
    fast, why = TiktokenBPE.build(Tokenizer.from_str(js), js)
    assert fast is None and "ids differ" in why


def test_refused_for_other_tokenizers(data_tok_dir, monkeypatch):
    base = json.loads((data_tok_dir / "tokenizer.json").read_text())
    for change in ({"normalizer": {"type": "Lowercase"}},
                   {"pre_tokenizer": {"type": "Whitespace"}},
                   {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}},
                   {"model": {**base["model"], "dropout": 0.1}},
                   {"model": {**base["model"], "byte_fallback": True}}):
        js = json.dumps({**base, **change})
        fast, why = TiktokenBPE.build(Tokenizer.from_str(js), js)
        assert fast is None and why, change
    # a pattern that leaves gaps (HF keeps them as pieces, tiktoken drops them): each such document
    # would go to Rust (its ids do not cover its bytes), so the start-up check refuses the path
    gappy = _with((data_tok_dir / "tokenizer.json").read_text(), _split(r"\p{L}+"))
    fast, why = TiktokenBPE.build(Tokenizer.from_str(gappy), gappy)
    assert fast is None and "probe" in why
    d, _ = derive(json.loads(gappy))
    assert TiktokenBPE(d).ids("word") is not None and TiktokenBPE(d).ids("two words") is None
    # the gap check of a whole batch (one segmented sum) still tells the documents apart
    got = TiktokenBPE(d).ids_batch(["word", "two words", "x", "", "a b", "café"])
    assert [g is not None for g in got] == [True, False, True, True, False, True]
    monkeypatch.setenv("CPT_PREP_FAST", "0")
    assert fast_path_ok(((data_tok_dir / "tokenizer.json").read_text(), 0, 1, "uint16")) == (False, "CPT_PREP_FAST=0", ())


def test_a_disagreement_the_startup_checks_missed_stops_preparation(data_tok_dir):
    """The sampled cross-check: if the path ever returned other ids, encoding fails loudly, naming the switch."""
    from engine.data.sources import DataError

    js = (data_tok_dir / "tokenizer.json").read_text()
    enc = Encoder(js, 0, 1, "uint16", fast=True)
    assert enc.fast is not None
    enc(make_docs(10, seed=1))  # agrees: no error
    assert enc.checked_docs == 1  # document 0
    real = enc.fast.ids_batch

    def wrong(texts):
        return [None if x is None else np.concatenate([x[:-1], x[-1:] ^ 1]).astype(np.uint32) for x in real(texts)]
    enc.fast.ids_batch = wrong  # one wrong id per document
    # the documents checked are those numbered 0, 64, 128, ... in the stream: a batch of documents
    # 1..63 has none of them, documents 10..209 (numbered by the encoder's own calls) have three
    enc(make_docs(63, seed=2), 1)
    with pytest.raises(DataError, match="CPT_PREP_FAST=0"):
        enc(make_docs(200, seed=2))


def test_the_sampled_check_leaves_out_documents_too_long_to_re_encode(data_tok_dir, monkeypatch):
    """A sampled document over VERIFY_MAX_CHARS is counted, not re-encoded (the Rust Encoding of a
    multi-megabyte document would be hundreds of MB); the next sampled one is checked as usual."""
    import engine.data.tokenize as tokenize
    from engine.data.sources import DataError

    monkeypatch.setattr(tokenize, "VERIFY_MAX_CHARS", 500)
    enc = Encoder((data_tok_dir / "tokenizer.json").read_text(), 0, 1, "uint16", fast=True)
    real = enc.fast.ids_batch
    enc.fast.ids_batch = lambda texts: [None if x is None else np.concatenate([x[:-1], x[-1:] ^ 1]).astype(np.uint32)
                                        for x in real(texts)]
    long_doc = "alpha beta gamma " * 40  # 680 characters
    enc([long_doc] + make_docs(63, seed=4), 0)  # document 0 is sampled but too long: not compared
    assert (enc.checked_docs, enc.skipped_long) == (0, 1)
    with pytest.raises(DataError, match="CPT_PREP_FAST=0"):
        enc(make_docs(1, seed=5), 64)  # document 64 is short: compared, and the wrong id is caught


def test_shards_are_byte_identical_with_the_path_on_and_off(data_tok_dir, tmp_path, monkeypatch):
    import engine.data.pack as pack
    import engine.data.tokenize as tokenize
    from engine.data.pack import Tokenizer as PrepTokenizer, prepare_source
    from engine.spec import SourceSpec

    monkeypatch.setenv("CPT_SHARD_TOKENS", "4096")
    docs = make_docs(3000, seed=7) + TEXTS * 20 + ["x" * 200_000] + make_docs(1000, seed=8)
    src = write_jsonl(tmp_path / "src.jsonl", docs)
    tok = PrepTokenizer(data_tok_dir)
    outs = {}
    # path on with 2 and 3 threads, small batches and a small window (many batches in flight,
    # finishing out of order), and off (2 worker processes): the same bytes
    for flag, workers, batch in (("1", "2", None), ("1", "3", 20_000), ("0", "2", None)):
        monkeypatch.setenv("CPT_PREP_FAST", flag)
        monkeypatch.setenv("CPT_PREP_WORKERS", workers)  # a pool even for a small source: the path is used
        if batch:
            monkeypatch.setattr(pack, "BATCH_CHARS", batch)
            monkeypatch.setattr(tokenize, "WINDOW_CHARS", 4 * batch)
        out = tmp_path / f"out-{flag}-{workers}"
        man = prepare_source(SourceSpec(path=str(src), val_fraction=0.05, keep_boundaries=True), "src", tok, out,
                             tok.fingerprint(data_tok_dir))
        outs[flag, workers] = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".bin", ".idx")}
        assert man["train"]["tokens"] > 0
    assert len(outs["1", "2"]) > 3 and outs["1", "2"] == outs["1", "3"] == outs["0", "2"]


def test_a_mismatch_during_preparation_stops_it_and_nothing_is_complete(data_tok_dir, tmp_path, monkeypatch):
    """The sampled cross-check inside a whole preparation (threads): a wrong id after the start-up
    check passed raises DataError naming the switch, and the source has no manifest."""
    from engine.data.pack import Tokenizer as PrepTokenizer, prepare_source
    from engine.data.sources import DataError
    from engine.spec import SourceSpec

    monkeypatch.setenv("CPT_PREP_WORKERS", "2")
    monkeypatch.setenv("CPT_PREP_FAST", "1")
    tok = PrepTokenizer(data_tok_dir)
    assert fast_path_ok(tok.encoder_args())[0]  # the start-up check passes (and its result is kept)
    real = TiktokenBPE.ids_batch

    def wrong(self, texts):
        return [None if x is None else np.concatenate([x[:-1], x[-1:] ^ 1]).astype(np.uint32) for x in real(self, texts)]
    monkeypatch.setattr(TiktokenBPE, "ids_batch", wrong)
    src = write_jsonl(tmp_path / "src.jsonl", make_docs(3000, seed=9))
    out = tmp_path / "out"
    with pytest.raises(DataError, match="CPT_PREP_FAST=0"):
        prepare_source(SourceSpec(path=str(src)), "src", tok, out, tok.fingerprint(data_tok_dir))
    assert not (out / "manifest.json").exists()
