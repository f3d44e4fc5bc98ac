"""Exact tiktoken encoding for byte-level BPE tokenizers (GPT-2, Llama 3, Qwen 2/3, HF-trained).

tiktoken is the encoder these vocabularies were built for: its BPE merges the adjacent pair whose
concatenated bytes have the lowest rank, and the rank is the output id. A Hugging Face byte-level
BPE merges the pair with the lowest merge index instead. The two agree when the vocabulary is
rank-consistent, so this module derives tiktoken's `mergeable_ranks` (token bytes → id) from the
tokenizer's own vocabulary and merges, its pre-tokenizer pattern and normalizer, and proves the
derivation before using it:

  * `derive` (structure, every merge): model BPE without dropout, byte fallback, subword prefix or
    suffix; no normalizer or NFC; ByteLevel(use_regex) or Split(regex, Isolated) + ByteLevel(no
    regex), no prefix space; every vocabulary string decodes through the ByteLevel alphabet, all 256
    bytes are tokens, no two tokens share bytes; for every merge `a b`: `a`, `b`, `ab` are tokens
    and id(ab) never decreases along the merge list (merge priority = rank); every multi-byte
    token is the result of a merge. (Trained vocabularies have one merge per token, converted
    tiktoken ones every split of each token into two tokens; both pass.) Anything else: None with the reason, and the
    Rust tokenizer is used.
  * `verify` (behaviour, once per tokenizer and library versions, verdict cached in
    ~/.cache/cpt-tui): unless the tokenizer has `ignore_merges`, the BPE of every token's own bytes
    is that token (tiktoken returns a whole piece found in the vocabulary as is); and the ids of
    tiktoken equal the Rust tokenizer's on a probe of every character of the ranges where the two
    regex engines (tiktoken's fancy-regex, the tokenizer's Oniguruma) are trusted, in the contexts
    the patterns tell apart, plus awkward samples. A wrong rank table or a disagreeing pattern
    fails here and the path is off.
  * per document (`TiktokenBPE.ids`): a document goes to the Rust tokenizer when it has a character
    outside those ranges (lone surrogates included) or an added token (HF splits those out before
    pre-tokenization), or when tiktoken's ids do not cover all its bytes (a pattern that leaves
    gaps: HF keeps the gaps as pieces, tiktoken drops them).
  * during preparation, one document in 64 of this path is re-encoded by the Rust tokenizer
    (engine.data.tokenize): a mismatch stops the preparation.
The choice depends only on the tokenizer, the library versions and each document's text, so the
token stream is a pure function of the documents.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import unicodedata
from typing import Iterable, Optional

import numpy as np

SWITCH = "CPT_PREP_FAST=0"  # the environment setting that turns this path off (named in errors)

# The GPT-2 pattern of tokenizers' ByteLevel pre-tokenizer (use_regex=True).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Characters for which the path may be used: every assigned character of the BMP (by this Python's
# Unicode database; surrogates and private use excluded) and the emoji / symbol and mathematical
# alphanumeric blocks of plane 1. The start-up probe checks every one of them in context; the few
# on which the two regex engines (or the two Unicode versions) disagree are excluded for that
# tokenizer, and a document with an excluded or any other character goes to the Rust tokenizer.
CANDIDATE_BLOCKS = [(0x0000, 0xD7FF), (0xF900, 0xFFFD), (0x1D400, 0x1D7FF), (0x1F000, 0x1FAFF)]
MAX_EXCLUDED = 500  # more disagreeing characters than this: the path is refused altogether


def candidate_chars() -> list[int]:
    return [c for a, b in CANDIDATE_BLOCKS for c in range(a, b + 1)
            if unicodedata.category(chr(c)) not in ("Cn", "Cs", "Co")]


def _ranges(cps: list[int]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for c in sorted(cps):
        if out and c == out[-1][1] + 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return [(a, b) for a, b in out]


def _unsafe_regex(excluded: frozenset) -> tuple[re.Pattern, Optional[re.Pattern]]:
    """(a character outside the safe set, an ASCII character outside it or None)."""
    safe = [c for c in candidate_chars() if c not in excluded]
    cls = "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in _ranges(safe))
    bad_ascii = [c for c in range(128) if c not in set(safe)]
    return re.compile(f"[^{cls}]"), (re.compile("[" + "".join(f"\\x{c:02x}" for c in bad_ascii) + "]") if bad_ascii else None)


PROBE_VERSION = 2  # bump when the probe changes: cached verdicts are then recomputed


def byte_decoder() -> dict[str, int]:
    """GPT-2's ByteLevel alphabet: printable character → byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Derivation:
    """What tiktoken needs (pattern, ranks) plus what the caller must do around it (NFC, added tokens)."""

    def __init__(self, pattern: str, ranks: dict[bytes, int], nfc: bool, added: list[str], ignore_merges: bool):
        self.pattern, self.ranks, self.nfc, self.added, self.ignore_merges = pattern, ranks, nfc, added, ignore_merges


def _pattern(pre: dict) -> tuple[Optional[str], str]:
    if pre.get("type") == "ByteLevel":
        if not pre.get("use_regex", True) or pre.get("add_prefix_space"):
            return None, "ByteLevel pre-tokenizer without its regex or with add_prefix_space"
        return GPT2_PATTERN, ""
    if pre.get("type") == "Sequence":
        seq = pre.get("pretokenizers") or []
        if (len(seq) == 2 and seq[0].get("type") == "Split" and seq[0].get("behavior") == "Isolated"
                and not seq[0].get("invert") and seq[1].get("type") == "ByteLevel"
                and not seq[1].get("use_regex", True) and not seq[1].get("add_prefix_space")):
            pat = seq[0].get("pattern") or {}
            if "Regex" in pat:
                return pat["Regex"], ""
            if "String" in pat:
                return re.escape(pat["String"]), ""
    return None, f"pre-tokenizer {json.dumps(pre)[:120]} is not ByteLevel or Split(Isolated) + ByteLevel"


def derive(spec: dict) -> tuple[Optional[Derivation], str]:
    """(derivation, "") for a rank-consistent byte-level BPE tokenizer.json, else (None, why not)."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None, "not a BPE model"
    if model.get("dropout") not in (None, 0, 0.0) or model.get("byte_fallback") \
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None, "BPE with dropout, byte fallback or a subword prefix/suffix"
    norm = spec.get("normalizer")
    if norm is not None and norm.get("type") == "Sequence" and not norm.get("normalizers"):
        norm = None
    if norm is not None and norm.get("type") != "NFC":
        return None, f"normalizer {norm.get('type')} (only none or NFC)"
    pattern, why = _pattern(spec.get("pre_tokenizer") or {})
    if pattern is None:
        return None, why
    added = spec.get("added_tokens") or []
    added_ids = {a["id"] for a in added}
    dec = byte_decoder()
    vocab: dict[str, int] = model.get("vocab") or {}
    ranks: dict[bytes, int] = {}
    by_str: dict[str, int] = {}
    for s, i in vocab.items():
        if i in added_ids:
            continue
        try:
            b = bytes(dec[c] for c in s)
        except KeyError:
            return None, f"vocabulary entry {s!r} is not in the ByteLevel alphabet"
        if b in ranks:
            return None, f"two tokens with the bytes {b!r}"
        ranks[b] = i
        by_str[s] = i
    if any(bytes([b]) not in ranks for b in range(256)):
        return None, "not all 256 bytes are tokens"
    merged: set[str] = set()
    last = -1
    for k, m in enumerate(model.get("merges") or []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        ia, ib, iab = by_str.get(a), by_str.get(b), by_str.get(a + b)
        if ia is None or ib is None or iab is None:
            return None, f"merge {k} ({a!r} {b!r}) uses or makes a string outside the vocabulary"
        if iab < last:
            return None, f"merge {k} ({a!r} {b!r}): id {iab} below the previous merge's {last} (ids do not follow merge order)"
        last = iab
        merged.add(a + b)
    for s, i in by_str.items():
        if len(s) > 1 and s not in merged:
            return None, f"token {s!r} (id {i}) is no merge's result"
    return Derivation(pattern, ranks, norm is not None, [a["content"] for a in added if a.get("content")],
                      bool(model.get("ignore_merges"))), ""


def probe_contexts(chars: list[str]) -> list[str]:
    """Every safe character in the contexts the patterns tell apart: inside a letter run, a digit
    run, a white-space run, a punctuation run, after an apostrophe, around line breaks."""
    return [f"a{c}b {c}{c}x 1{c}2 '{c} '{c}{c} {c}\n{c}\r\n {c}  {c}\t{c} " for c in chars]


PROBE_CHUNK = 256  # contexts per probe text (the tokenizer is slow on one huge text)


SAMPLES = [
    "Hello, world! It's a test: don't stop 'til 12345 items.\n\n  Tabs\tand   spaces  \r\n",
    "It's John's book; they'RE here, we'VE gone, I'M ok, he'LL go, she'D say. ''''  's a'",
    "numbers 1 12 123 1234 12345678901234 3.14159 -42 1e10 ٣٤٥ १२३",
    "café naïve Ångström façade Œuvre ß ǅ ǈ İstanbul ΑΒΓ αβγ ώ привет мир Ёж e\u0301 a\u0308",
    "中文字符测试，标点。日本語のテキスト、カタカナ ひらがな。한국어 문장입니다.",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tif x != 0: pass\n\n\n   ",
    "NBSP\u00a0here\u2003em\u2009thin   \u00a0\u00a0 x=1+2; y = [a, b]  # end   ",
    " ", "\n", "  \n  ", "x", "...!!!???", "a" * 3000, " " * 500 + "x", "ab3$" * 400,
]


def _cache_file():
    from pathlib import Path
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cpt-tui" / "tiktoken-probe.json"


def _probe_key(tokenizer_json: str) -> str:
    import tiktoken
    import tokenizers
    k = (f"{hashlib.sha256(tokenizer_json.encode()).hexdigest()}|{tiktoken.__version__}|{tokenizers.__version__}"
         f"|{unicodedata.unidata_version}|{CANDIDATE_BLOCKS}|{MAX_EXCLUDED}|{PROBE_VERSION}")
    return hashlib.sha256(k.encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=8)
def _unsafe_cached(excluded: frozenset):
    return _unsafe_regex(excluded)


class TiktokenBPE:
    """ids of documents through tiktoken (uint32 arrays), or None where a document must go to Rust."""

    def __init__(self, d: Derivation, excluded: Iterable[int] = ()):
        import tiktoken

        self.d = d
        self.enc = tiktoken.Encoding("cpt-tui", pat_str=d.pattern, mergeable_ranks=d.ranks, special_tokens={})
        self._core = self.enc._core_bpe  # encode_to_tiktoken_buffer: releases the GIL, no Python ints
        self._none: set = set()
        self.excluded = frozenset(excluded)
        self._unsafe, self._ascii_unsafe = _unsafe_cached(self.excluded)
        added = sorted(set(d.added), key=len, reverse=True)
        self._added = re.compile("|".join(map(re.escape, added))) if added else None
        n = max(d.ranks.values()) + 1
        self.byte_len = np.zeros(n, dtype=np.int64)  # bytes of each id (gap check)
        for b, i in d.ranks.items():
            self.byte_len[i] = len(b)

    @classmethod
    def build(cls, tok, tokenizer_json: str, check=True) -> tuple[Optional["TiktokenBPE"], str]:
        """(the path, "") or (None, why not). check: True runs the start-up check (`verify_cached`);
        a collection of code points: the caller checked, these are the characters it excluded;
        False: no check (tests of the check itself)."""
        try:
            import tiktoken  # noqa: F401
        except ImportError:
            return None, "tiktoken is not installed"
        try:
            d, why = derive(json.loads(tokenizer_json))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            return None, f"unreadable tokenizer.json ({e})"
        if d is None:
            return None, why
        try:
            fast = cls(d, () if check is True or check is False else check)
        except Exception as e:  # e.g. a pattern fancy-regex does not read
            return None, f"tiktoken refuses the derivation ({e})"
        if check is True:
            why, excluded = verify_cached(tok, tokenizer_json, fast)
            if why:
                return None, why
            if excluded:
                fast = cls(d, excluded)
        return fast, ""

    def ids(self, text: str) -> Optional[np.ndarray]:
        """The document's ids (uint32), or None: it goes to the Rust tokenizer."""
        ascii_ = text.isascii()
        if ascii_:
            if self._ascii_unsafe is not None and self._ascii_unsafe.search(text):
                return None
        elif self._unsafe.search(text):
            return None
        elif self.d.nfc and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
            if self._unsafe.search(text):
                return None
        if self._added is not None and self._added.search(text):
            return None
        out = np.frombuffer(self._core.encode_to_tiktoken_buffer(text, self._none), dtype=np.uint32)
        if int(self.byte_len[out].sum()) != (len(text) if ascii_ else len(text.encode("utf-8"))):
            return None  # the pattern left characters out (HF keeps them as pieces): Rust
        return out


def verify(tok, fast: TiktokenBPE) -> tuple[str, list[int]]:
    """("", excluded characters) when tiktoken with this derivation gives the Rust tokenizer's ids,
    else (what differs, [])."""
    d = fast.d
    if not d.ignore_merges:
        inv = {v: k for k, v in byte_decoder().items()}
        for b, i in d.ranks.items():
            if len(b) > 1:
                got = [t.id for t in tok.model.tokenize("".join(inv[x] for x in b))]
                if got != [i]:
                    return f"the BPE of token {i}'s own bytes is {got[:8]}, not [{i}] (tiktoken would return {i})", []
    chars = [chr(c) for c in candidate_chars() if c not in fast.excluded]
    ctx = probe_contexts(chars)
    probe = ["".join(ctx[i:i + PROBE_CHUNK]) for i in range(0, len(ctx), PROBE_CHUNK)]
    got = [fast.ids(t) for t in probe]
    if sum(g is not None for g in got) < 0.8 * len(probe):  # e.g. a pattern that leaves gaps
        return "most of the probe text does not go through the path", []
    excluded: list[int] = []
    for g0 in range(0, len(probe), 16):
        ref = [e.ids for e in tok.encode_batch_fast(probe[g0:g0 + 16], add_special_tokens=False)]
        for k, r in enumerate(ref, g0):
            if got[k] is not None and not _compare(fast, probe[k], r, got[k]):
                continue
            # a chunk that differs, or that the path does not take (with NFC a few characters
            # compose or map outside the set): its contexts one by one
            sub = ctx[k * PROBE_CHUNK:(k + 1) * PROBE_CHUNK]
            sref = [e.ids for e in tok.encode_batch_fast(sub, add_special_tokens=False)]
            bad = [chars[k * PROBE_CHUNK + j] for j, (c, cr) in enumerate(zip(sub, sref)) if _compare(fast, c, cr)]
            if got[k] is not None and not bad:
                return f"probe text {k} differs but none of its characters alone does: {_compare(fast, probe[k], r, got[k])}", []
            excluded += map(ord, bad)
        if len(excluded) > MAX_EXCLUDED:
            return f"the tokenizer and tiktoken disagree on more than {MAX_EXCLUDED} characters (e.g. {chr(excluded[0])!r})", []
    fast = TiktokenBPE(d, set(excluded) | fast.excluded) if excluded else fast
    texts = SAMPLES + [" " + s.upper() for s in SAMPLES] + ["\n".join(SAMPLES) * 3]
    texts += ["".join(ctx[i:i + PROBE_CHUNK]) for i in range(0, len(ctx), PROBE_CHUNK * 16)]  # after exclusion
    ref = [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
    for t, r in zip(texts, ref):
        why = _compare(fast, t, r)
        if why:
            return why, []
    return "", sorted(set(excluded) | fast.excluded)


def _compare(fast: TiktokenBPE, t: str, r: list[int], got=False) -> str:
    if got is False:
        got = fast.ids(t)
    if got is None:
        return ""
    g = got.tolist()
    if g != r:
        k = next((j for j, (x, y) in enumerate(zip(g, r)) if x != y), min(len(g), len(r)))
        return f"ids differ from the tokenizer's at token {k} on {t[:40]!r}... ({g[k:k + 5]} vs {r[k:k + 5]})"
    return ""


def verify_cached(tok, tokenizer_json: str, fast: TiktokenBPE) -> tuple[str, list[int]]:
    """`verify`, its verdict kept per tokenizer and library versions in ~/.cache/cpt-tui (seconds for 100k+ vocabularies)."""
    key = _probe_key(tokenizer_json)
    path = _cache_file()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    v = known.get(key)
    if isinstance(v, dict) and isinstance(v.get("why"), str) and isinstance(v.get("excluded"), list):
        return v["why"], v["excluded"]
    try:
        why, excluded = verify(tok, fast)
    except Exception as e:
        why, excluded = f"the check failed ({e})", []
    try:  # best effort: an unwritable cache only costs the check next time
        known[key] = {"why": why, "excluded": excluded}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, path)
    except OSError:
        pass
    return why, excluded
