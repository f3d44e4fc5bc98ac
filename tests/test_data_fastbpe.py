"""The fast path of preparation's tokenization (engine.data.fastbpe) gives exactly the Rust
tokenizer's ids, document by document, for GPT-2 style and Llama 3 / Qwen2 style (Split + ByteLevel,
NFC) tokenizers; documents it cannot vouch for (added tokens, characters outside its safe ranges,
lone surrogates) go to the Rust tokenizer; unsupported tokenizers get no fast path at all."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from engine.data.fastbpe import FastBPE
from engine.data.tokenize import Encoder, fast_path_ok
from tests.test_data_pack import data_tok_dir, make_docs  # noqa: F401  (fixture)

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

TEXTS = [
    "Hello, world! It's John's book; they'RE here, we'VE gone, I'M ok, he'LL go, she'D say.",
    "numbers 1 12 123 1234 12345678901234 3.14159 -42 1e10 ①②③ ٣٤٥ १२३",
    "  leading spaces\ttabs\t\tand\r\nwindows\r\n\r\nlines   trailing   \n\n\n",
    "café naïve Ångström façade Œuvre ß ſ ǅ ǈ İstanbul ΑΒΓ αβγ ώ привет мир Ёж",
    "中文字符测试，标点。日本語のテキスト、カタカナ ひらがな。한국어 문장입니다.",
    "emoji 😀👍🏽 astral 𝔘𝔫𝔦 and combining e\u0301 a\u0308 and NBSP\u00a0here\u2003em\u2009thin",
    "control \x0b\x0c\x1c\x1d\x1e\x1f\x85\u2028\u2029 chars and zero\u200bwidth\u200djoiner",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tif x != 0: pass\n",
    "special <|end_of_text|> inside and <|begin_of_text|> again <|pad|>",
    "Armenian \u0558\u0559 new letters \ua7ce\ua7cf and \u0c5c",
    "x", " ", "\n", "''''", "'s", " 's", "a'", "...!!!???", "\u00a0\u00a0", "e\u0301",
] + make_docs(50, seed=3)


def _with_pre(tok_dir, pre: dict, normalizer=None) -> str:
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"], spec["normalizer"] = pre, normalizer
    return json.dumps(spec)


def _variants(tok_dir) -> dict[str, str]:
    gpt2 = (tok_dir / "tokenizer.json").read_text()
    split = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    gappy = {"type": "Sequence", "pretokenizers": [  # a pattern that leaves gaps: they are pieces too
        {"type": "Split", "pattern": {"Regex": r"\p{L}+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    return {"gpt2": gpt2, "llama3": _with_pre(tok_dir, split), "qwen2-nfc": _with_pre(tok_dir, split, {"type": "NFC"}),
            "gaps": _with_pre(tok_dir, gappy)}


@pytest.mark.parametrize("variant", ["gpt2", "llama3", "qwen2-nfc", "gaps"])
def test_fast_path_ids_equal_rust(variant, data_tok_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the probe runs (and its verdict is kept there)
    js = _variants(data_tok_dir)[variant]
    tok = Tokenizer.from_str(js)
    fast = FastBPE.build(tok, js)
    assert fast is not None
    assert list((tmp_path / "cpt-tui").glob("fastbpe-probe.json"))
    for t in TEXTS + [t * 3 for t in TEXTS]:
        got = fast(t)
        ref = tok.encode(t, add_special_tokens=False).ids
        assert got is None or got == ref, repr(t)
    # the fast path takes ordinary text, and leaves added tokens and unsafe characters to Rust
    assert fast(TEXTS[0]) is not None and fast(TEXTS[4]) is not None
    assert fast(TEXTS[8]) is None and fast(TEXTS[5]) is None
    # whole batches through the Encoder: same flat tokens and lengths as without the fast path
    args = (js, 0, 1, "uint16")
    a, b = Encoder(*args, fast=True), Encoder(*args)
    assert a.fast is not None
    batch = TEXTS + ["lone \ud800 surrogate"] + make_docs(20, seed=5)
    (fa, la, ba), (fb, lb, bb) = a(batch), b(batch)
    assert np.array_equal(fa, fb) and np.array_equal(la, lb) and ba == bb == [len(TEXTS)]


def test_fast_path_refused_for_other_tokenizers(data_tok_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    base = json.loads((data_tok_dir / "tokenizer.json").read_text())
    for change in ({"normalizer": {"type": "Lowercase"}},
                   {"pre_tokenizer": {"type": "Whitespace"}},
                   {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}},
                   {"model": {**base["model"], "dropout": 0.1}}):
        js = json.dumps({**base, **change})
        assert FastBPE.build(Tokenizer.from_str(js), js) is None, change
    monkeypatch.setenv("CPT_PREP_FAST", "0")
    assert not fast_path_ok(((data_tok_dir / "tokenizer.json").read_text(), 0, 1, "uint16"))


def test_a_disagreement_the_startup_checks_missed_stops_preparation(data_tok_dir):
    """The sampled cross-check: if the fast path ever returned other ids, encoding fails loudly."""
    from engine.data.sources import DataError

    js = (data_tok_dir / "tokenizer.json").read_text()
    enc = Encoder(js, 0, 1, "uint16", fast=True)
    assert enc.fast is not None
    enc(make_docs(10, seed=1))  # agrees: no error
    real = enc.fast.__call__
    enc.fast = lambda t: (lambda ids: ids and ids[:-1] + [ids[-1] ^ 1])(real(t))  # one wrong id per document
    with pytest.raises(DataError, match="CPT_PREP_FAST=0"):
        enc(make_docs(200, seed=2))
