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
    Rust tokenizer is used. `derive_cached` keeps the result per tokenizer.json and version of this
    module (with a digest: a damaged file is derived again).
  * `verify` (behaviour, once per tokenizer and library versions, verdict cached in
    ~/.cache/cpt-tui): unless the tokenizer has `ignore_merges`, the BPE of every token's own bytes
    is that token (tiktoken returns a whole piece found in the vocabulary as is); and the ids of
    tiktoken equal the Rust tokenizer's on a probe of every character of the ranges where the two
    regex engines (tiktoken's fancy-regex, the tokenizer's Oniguruma) are trusted, in the contexts
    the patterns tell apart, plus awkward samples. A wrong rank table or a disagreeing pattern
    fails here and the path is off.
  * per document (`TiktokenBPE.admit`, `ids_batch`): a document goes to the Rust tokenizer when it
    has a character outside those ranges (lone surrogates included) or an added token (HF splits
    those out before pre-tokenization), or when tiktoken's ids do not cover all its bytes (a pattern
    that leaves gaps: HF keeps the gaps as pieces, tiktoken drops them). The character and
    added-token checks are compiled regex scans of each text, the byte check one table lookup and
    segmented sum per batch; none of it is per-character Python.
  * during preparation, documents 0, 64, 128, ... of the stream that took this path are re-encoded
    by the Rust tokenizer (engine.data.tokenize; those up to 1 Mi characters): a mismatch stops the
    preparation.
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

from engine.data.sources import _loads

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
    bad_ascii = [c for c in range(128) if c in excluded]
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
    # ByteLevel alphabet → bytes with one str.translate + latin-1 encode per entry: an alphabet
    # character becomes the code point of its byte, any other character one latin-1 cannot encode
    to_byte = dict.fromkeys(range(256), 0x100)
    to_byte.update({ord(c): b for c, b in byte_decoder().items()})
    vocab: dict[str, int] = model.get("vocab") or {}
    # (comprehensions and maps, no per-entry Python loop: this runs before every preparation)
    strs = [s for s, i in vocab.items() if i not in added_ids]
    ids = [vocab[s] for s in strs]
    try:
        bs = [s.translate(to_byte).encode("latin-1") for s in strs]
    except UnicodeEncodeError:
        s = next(s for s in strs if any(ord(c) not in to_byte or to_byte[ord(c)] == 0x100 for c in s))
        return None, f"vocabulary entry {s!r} is not in the ByteLevel alphabet"
    ranks: dict[bytes, int] = dict(zip(bs, ids))
    if len(ranks) < len(bs):
        seen: set = set()
        b = next(b for b in bs if b in seen or seen.add(b))
        return None, f"two tokens with the bytes {b!r}"
    by_str: dict[str, int] = dict(zip(strs, ids))
    if any(bytes([b]) not in ranks for b in range(256)):
        return None, "not all 256 bytes are tokens"
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    if any(len(p) != 2 for p in pairs):
        k = next(k for k, p in enumerate(pairs) if len(p) != 2)
        return None, f"merge {k} ({pairs[k]!r}) is not a pair"
    left, right = [p[0] for p in pairs], [p[1] for p in pairs]
    joined = list(map(str.__add__, left, right))
    get = by_str.get
    ia, ib, iab = list(map(get, left)), list(map(get, right)), list(map(get, joined))
    if None in ia or None in ib or None in iab:
        k = next(k for k in range(len(pairs)) if ia[k] is None or ib[k] is None or iab[k] is None)
        return None, f"merge {k} ({left[k]!r} {right[k]!r}) uses or makes a string outside the vocabulary"
    down = np.flatnonzero(np.diff(np.asarray(iab, dtype=np.int64)) < 0) if iab else []
    if len(down):
        k = int(down[0]) + 1
        return None, (f"merge {k} ({left[k]!r} {right[k]!r}): id {iab[k]} below the previous merge's {iab[k - 1]} "
                      "(ids do not follow merge order)")
    merged = set(joined)
    for s in strs:
        if len(s) > 1 and s not in merged:
            return None, f"token {s!r} (id {by_str[s]}) is no merge's result"
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


def cache_dir():
    """The per-user cache of preparation ($XDG_CACHE_HOME/cpt-tui): the probe verdicts, rank tables and
    tokenizer facts, each keyed by content (engine/data/pack.py keeps its tokenizer facts here too)."""
    from pathlib import Path
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cpt-tui"


def _cache_file():
    return cache_dir() / "tiktoken-probe.json"


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for x in parts:
        h.update(len(x).to_bytes(8, "little") + x)
    return h.hexdigest()


def derive_cached(tokenizer_json: str) -> tuple[Optional[Derivation], str]:
    """`derive` of a tokenizer.json, kept in ~/.cache/cpt-tui per JSON and per version of this module
    (parsing a 100k vocabulary and checking every merge takes ~1 s; this file loads in ~0.05 s). It
    holds the token bytes, ids and a digest of everything: a file that does not match its digest, or
    cannot be read, is derived again."""
    try:
        code = open(__file__, "rb").read()
    except OSError:
        return derive(_loads(tokenizer_json))
    key = _digest(tokenizer_json.encode(), code)[:24]
    path = cache_dir() / f"tiktoken-ranks-{key}.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            meta, blob, lens, ids = bytes(z["meta"]), z["blob"], z["lens"], z["ids"]
        m = json.loads(meta)
        if m.pop("digest") == _digest(json.dumps(m, sort_keys=True).encode(), blob.tobytes(), lens.tobytes(), ids.tobytes()):
            if m["why"]:
                return None, m["why"]
            buf, ends = blob.tobytes(), np.cumsum(lens).tolist()
            ranks = {buf[a:b]: i for a, b, i in zip([0] + ends[:-1], ends, ids.tolist())}
            return Derivation(m["pattern"], ranks, m["nfc"], m["added"], m["ignore_merges"]), ""
    except Exception:  # absent, unreadable or from another numpy: derived again
        pass
    d, why = derive(_loads(tokenizer_json))
    toks = list(d.ranks) if d is not None else []
    blob = np.frombuffer(b"".join(toks), dtype=np.uint8)
    lens = np.fromiter(map(len, toks), dtype=np.int64, count=len(toks))
    ids = np.fromiter((d.ranks[t] for t in toks), dtype=np.int64, count=len(toks))
    m = {"why": why, "pattern": d.pattern if d else None, "nfc": d.nfc if d else None,
         "added": d.added if d else None, "ignore_merges": d.ignore_merges if d else None}
    m["digest"] = _digest(json.dumps(m, sort_keys=True).encode(), blob.tobytes(), lens.tobytes(), ids.tobytes())
    try:  # best effort, like the verdict cache
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.frombuffer(json.dumps(m).encode(), dtype=np.uint8), blob=blob, lens=lens, ids=ids)
        os.replace(tmp, path)
    except OSError:
        pass
    return d, why


def _probe_key(tokenizer_json: str) -> str:
    import tiktoken
    import tokenizers
    k = (f"{hashlib.sha256(tokenizer_json.encode()).hexdigest()}|{tiktoken.__version__}|{tokenizers.__version__}"
         f"|{unicodedata.unidata_version}|{CANDIDATE_BLOCKS}|{MAX_EXCLUDED}|{PROBE_VERSION}")
    return hashlib.sha256(k.encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=8)
def _unsafe_cached(excluded: frozenset):
    return _unsafe_regex(excluded)


# tiktoken's encode (the one that hands back a buffer) looks for the next *allowed* special token
# before each stretch of ordinary text; with no special token at all that search is an empty regex
# matching at every position (~40% slower than encode_ordinary). A special token that is never
# allowed makes it a plain substring search, and the ids stay those of encode_ordinary: a special
# token that is not allowed is ordinary text to tiktoken's core (the Python-level check that raises
# on one is not called here).
SENTINEL = "\U0010fffd<|cpt-tui never allowed|>\U0010fffd"


class TiktokenBPE:
    """ids of documents through tiktoken (uint32 arrays), or None where a document must go to Rust."""

    def __init__(self, d: Derivation, excluded: Iterable[int] = ()):
        import tiktoken

        self.d = d
        n = max(d.ranks.values()) + 1
        self.enc = tiktoken.Encoding("cpt-tui", pat_str=d.pattern, mergeable_ranks=d.ranks, special_tokens={SENTINEL: n})
        self._core = self.enc._core_bpe  # encode_to_tiktoken_buffer: releases the GIL, no Python ints
        self._none: set = set()  # allowed special tokens: none
        self.set_excluded(excluded)
        added = sorted(set(d.added), key=len, reverse=True)
        self._added = re.compile("|".join(map(re.escape, added))) if added else None
        lens = np.zeros(n, dtype=np.int64)  # bytes of each id (gap check)
        for b, i in d.ranks.items():
            lens[i] = len(b)
        top = int(lens.max())
        self.byte_len = lens.astype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int64)

    def copy(self) -> "TiktokenBPE":
        """The same path with its own tiktoken core (for another thread; ~0.2 s at 100k tokens)."""
        import tiktoken

        new = object.__new__(TiktokenBPE)
        new.__dict__.update(self.__dict__)
        new.enc = tiktoken.Encoding("cpt-tui", pat_str=self.d.pattern, mergeable_ranks=self.d.ranks,
                                    special_tokens=self.enc._special_tokens)
        new._core, new._none = new.enc._core_bpe, set()
        return new

    def set_excluded(self, excluded: Iterable[int]) -> None:
        """The characters the start-up check excluded: documents with one go to Rust."""
        self.excluded = frozenset(excluded)
        self._unsafe, self._ascii_unsafe = _unsafe_cached(self.excluded)

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
            d, why = derive_cached(tokenizer_json)
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
                fast.set_excluded(excluded)
        return fast, ""

    def admit(self, text: str) -> Optional[str]:
        """The text tiktoken encodes for this document (NFC-normalized if the tokenizer normalizes),
        or None when it has a character outside the verified set (lone surrogates included) or an
        added token: the document goes to the Rust tokenizer. C-speed regex scans, no per-character
        Python work (isascii is O(1))."""
        if text.isascii():
            if self._ascii_unsafe is not None and self._ascii_unsafe.search(text):
                return None
        else:
            if self._unsafe.search(text):
                return None
            if self.d.nfc and not unicodedata.is_normalized("NFC", text):
                text = unicodedata.normalize("NFC", text)
                if self._unsafe.search(text):
                    return None
        if self._added is not None and self._added.search(text):
            return None
        return text

    def ids(self, text: str) -> Optional[np.ndarray]:
        """The document's ids (uint32), or None: it goes to the Rust tokenizer."""
        return self.ids_batch([text])[0]

    def ids_batch(self, texts: list[str]) -> list[Optional[np.ndarray]]:
        """`ids` of each text. tiktoken releases the GIL while it encodes; the gap check (the ids
        cover all the bytes of the text: HF keeps what the pattern leaves out as pieces, tiktoken
        drops it) is one table lookup and one segmented sum over the whole batch."""
        admitted = [self.admit(t) for t in texts]
        enc, none = self._core.encode_to_tiktoken_buffer, self._none
        out = [None if t is None else np.frombuffer(enc(t, none), dtype=np.uint32) for t in admitted]
        k = [i for i, x in enumerate(out) if x is not None]
        if not k:
            return out
        arrs = [out[i] for i in k]
        n = np.fromiter(map(len, arrs), dtype=np.int64, count=len(k))
        want = np.fromiter((len(t) if t.isascii() else len(t.encode("utf-8")) for t in (admitted[i] for i in k)),
                           dtype=np.int64, count=len(k))
        got = np.zeros(len(k), dtype=np.int64)
        nz = n > 0  # a document without ids (only possible for an empty text) sums to 0
        if nz.any():
            flat = arrs[0] if len(arrs) == 1 else np.concatenate(arrs)
            got[nz] = np.add.reduceat(self.byte_len[flat], (np.cumsum(n) - n)[nz], dtype=np.int64)
        for j in np.flatnonzero(got != want):
            out[k[j]] = None  # the pattern left characters out: Rust
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
