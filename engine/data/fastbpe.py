"""A faster exact path for byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2 style) in preparation.

The Rust tokenizer spends most of its time per token on things preparation throws away (the
`Encoding`'s token strings, offsets, masks). For a byte-level BPE the ids of a document are
exactly the concatenation, over the pieces of its pre-tokenization regex, of the BPE of each
piece's byte-level form; pieces repeat (Zipf), so a per-worker dict piece → ids, filled by the
tokenizer's own BPE model (`model.tokenize`), gives the same ids about twice as fast.

Exactness is kept by construction and checked, never assumed:
  * only the configurations known to work this way are accepted (no normalizer or NFC;
    ByteLevel(use_regex) or Split(regex, isolated) + ByteLevel(use_regex=False); BPE without
    dropout); anything else returns None and the Rust tokenizer is used;
  * a document is taken by this path only if all its characters lie in ranges where Python's
    `regex` and the tokenizer's Oniguruma agree on the character classes the patterns use
    (letters, digits, white space, case folding) and it contains no added token (those are split
    out before pre-tokenization): every other document goes to the Rust tokenizer;
  * at start the two are compared on a probe of every character of those ranges in several
    contexts (the installed library versions, not the ones this was written with): on any
    difference the fast path is off for the whole preparation.
The choice depends only on the tokenizer, the library versions and each document's text, so the
token stream stays a pure function of the documents (same bytes with any number of workers).
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from typing import Optional

# The GPT-2 pattern of tokenizers' ByteLevel pre-tokenizer (use_regex=True).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Characters for which the fast path is used: ASCII, Latin (incl. Extended-A/B and IPA), Greek,
# Cyrillic, Armenian, Hebrew, Arabic, Devanagari, Thai, Georgian, Hangul Jamo, general punctuation
# (spaces U+2000-U+200A included), CJK symbols, kana, CJK ideographs, Hangul syllables.
# Outside them (rare scripts, astral planes, surrogates, controls whose class is version dependent)
# a document goes to the Rust tokenizer. The startup probe checks every one of them.
SAFE_RANGES = [(0x0009, 0x000D), (0x0020, 0x007E), (0x00A0, 0x02AF), (0x0370, 0x03FF), (0x0400, 0x052F),
               (0x0531, 0x0557), (0x0559, 0x058A), (0x05D0, 0x05EA), (0x0600, 0x06FF), (0x0900, 0x097F), (0x0E00, 0x0E5B),
               (0x10A0, 0x10FF), (0x1100, 0x11FF), (0x2000, 0x200A), (0x2010, 0x2027), (0x2030, 0x205E),
               (0x3000, 0x303F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xFF01, 0xFF5E)]
_UNSAFE = re.compile("[^" + "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in SAFE_RANGES) + "]")

MAX_CACHED_PIECE = 64  # longer pieces (runs of spaces, base64) are encoded each time, not kept
CACHE_ENTRIES = 200_000  # per worker (~40 MB); the dict is cleared when full (the hot pieces come back at once)


def _byte_table() -> dict[int, str]:
    """GPT-2's bytes → printable characters, as a str.translate table over latin-1 code points."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _probe_text() -> str:
    """Every safe character in the contexts the patterns tell apart: inside a letter run, a digit
    run, a white-space run, a punctuation run, after an apostrophe, around line breaks."""
    chars = (chr(c) for a, b in SAFE_RANGES for c in range(a, b + 1))
    return "".join(f"a{c}b {c}{c}x 1{c}2 '{c} '{c}{c} {c}\n{c}\r\n {c}  {c}\t{c} " for c in chars) + "  end \n\n  "


def _probe_key(pattern: str, nfc: bool) -> str:
    import hashlib

    import regex
    import tokenizers
    k = f"{pattern}|{nfc}|{tokenizers.__version__}|{regex.__version__}|{unicodedata.unidata_version}|{SAFE_RANGES}|1"
    return hashlib.sha256(k.encode()).hexdigest()[:16]


def _cache_file():
    from pathlib import Path
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cpt-tui" / "fastbpe-probe.json"


def splits_agree(tok, fast: "FastBPE") -> bool:
    """Do Python's `regex` and the tokenizer's pre-tokenizer split every safe character alike?

    About a second: the verdict is kept per pattern and library versions in ~/.cache/cpt-tui."""
    key = _probe_key(fast.pattern, fast.nfc)
    path = _cache_file()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), bool):
        return known[key]
    text = _probe_text()
    try:
        norm = tok.normalizer.normalize_str(text) if tok.normalizer is not None else text
        ref = [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(norm)]
        if fast.nfc:
            text = unicodedata.normalize("NFC", text)
        ok = ref == [p.encode("utf-8").decode("latin-1").translate(fast.table) for p in fast._pieces(text)]
    except Exception:
        ok = False
    try:  # best effort: an unwritable cache only costs the probe next time
        known[key] = ok
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, path)
    except OSError:
        pass
    return ok


_SAMPLE = ("Hello, world! It's a test: don't stop 'til 12345 items.\n\n  Tabs\tand   spaces  \r\n"
           "caf\u00e9 na\u00efve \u00c5ngstr\u00f6m \u03b1\u03b2\u03b3 \u043f\u0440\u0438\u0432\u0435\u0442 "
           "\u4e2d\u6587\u5b57 \u3053\u3093\u306b\u3061\u306f \ud55c\uad6d\uc5b4 x=1+2; y = [a, b]  # end   ")


class FastBPE:
    """ids of a document (list of ints), or None when the document must go to the Rust tokenizer."""

    def __init__(self, tok, pattern: str, nfc: bool, added: list[str]):
        import regex  # a dependency of transformers; \p{L} etc. need it (the stdlib re has no \p)

        self.model = tok.model
        self.pattern = pattern
        self.finditer = regex.compile(pattern).finditer
        self.findall = regex.compile(pattern).findall
        self.nfc = nfc
        self.added = added
        self.added_first = "".join(sorted({a[0] for a in added if a}))
        self.table = str.maketrans({chr(b): c for b, c in _byte_table().items()})
        self.cache: dict[str, tuple] = {}

    @classmethod
    def build(cls, tok, tokenizer_json: str, probe: bool = True) -> Optional["FastBPE"]:
        """The fast path for this tokenizer, or None (unsupported configuration, or it disagrees)."""
        try:
            spec = json.loads(tokenizer_json)
        except ValueError:
            return None
        try:
            import regex  # noqa: F401
        except ImportError:
            return None
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or model.get("dropout") not in (None, 0, 0.0):
            return None
        norm = spec.get("normalizer")
        if norm is None:
            nfc = False
        elif norm.get("type") == "NFC":
            nfc = True
        else:
            return None
        pre = spec.get("pre_tokenizer") or {}
        pattern = None
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
            pattern = GPT2_PATTERN
        elif pre.get("type") == "Sequence":
            seq = pre.get("pretokenizers") or []
            if (len(seq) == 2 and seq[0].get("type") == "Split" and seq[0].get("behavior") == "Isolated"
                    and not seq[0].get("invert") and seq[1].get("type") == "ByteLevel"
                    and not seq[1].get("use_regex", True) and not seq[1].get("add_prefix_space")):
                pat = seq[0].get("pattern") or {}
                pattern = pat.get("Regex") if "Regex" in pat else (re.escape(pat["String"]) if "String" in pat else None)
        if pattern is None:
            return None
        added = [a["content"] for a in spec.get("added_tokens") or []]
        try:
            fast = cls(tok, pattern, nfc, added)
        except Exception:  # a pattern the regex module does not read
            return None
        return fast if (not probe or splits_agree(tok, fast)) and fast.agrees_with(tok) else None

    def agrees_with(self, tok) -> bool:
        """Same ids as the Rust tokenizer on a sample (byte mapping, BPE assembly, this vocabulary)."""
        sample = [_SAMPLE, _SAMPLE * 3, " " + _SAMPLE.upper(), "x", "  ", "\n"]
        try:
            ref = [e.ids for e in tok.encode_batch_fast(sample, add_special_tokens=False)]
            ok = all(self(t) == r for t, r in zip(sample, ref))
        except Exception:
            return False
        self.cache.clear()
        return ok

    def _miss(self, piece: str) -> tuple:
        ids = tuple(t.id for t in self.model.tokenize(piece.encode("utf-8").decode("latin-1").translate(self.table)))
        if len(piece) <= MAX_CACHED_PIECE:
            if len(self.cache) >= CACHE_ENTRIES:
                self.cache.clear()
            self.cache[piece] = ids
        return ids

    def _pieces(self, text: str) -> list[str]:
        """The pre-tokenization pieces (Isolated split: the text between matches is a piece too)."""
        pieces = self.findall(text)
        if sum(map(len, pieces)) == len(text):  # the usual case: the pattern matches every character
            return pieces
        out, pos = [], 0
        for m in self.finditer(text):
            if m.start() > pos:
                out.append(text[pos:m.start()])
            out.append(m.group())
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    def _has_added(self, text: str) -> bool:
        return bool(self.added_first) and any(c in text for c in self.added_first) and any(a in text for a in self.added)

    def __call__(self, text: str) -> Optional[list[int]]:
        if _UNSAFE.search(text) or self._has_added(text):
            return None
        if self.nfc and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
            if _UNSAFE.search(text) or self._has_added(text):
                return None
        get, miss = self.cache.get, self._miss
        out: list[int] = []
        ext = out.extend
        for p in self._pieces(text):
            v = get(p)
            ext(v if v is not None else miss(p))
        return out
