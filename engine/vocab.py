"""Vocabulary extension for a new language: new BPE tokens merged into a base tokenizer, and the
model's embedding rows initialised from the subwords they replace (Hewitt mean init / EEVE).

    report = extend_vocabulary(base_model, base_tokenizer, target_texts, out_dir, new_tokens=8000)

Pipeline: train a byte-level BPE tokenizer on the target language with the base's own
normalizer / pre-tokenizer; append its new tokens and merges (in merge order, so each one is
reachable) at the END of the base's BPE model, after every existing id; resize the embeddings
(padded) and initialise the new rows; save model + tokenizer; measure what changed.

Appending merges at the lowest priority means a base merge always wins: original-language text
is tokenized as before except where a word ends, under the base merges, exactly on the pair of
a new merge. That share is measured (`original_changed_word_share`), not assumed.

Runs on GPU nodes: imports only torch / transformers / tokenizers (never cpt_tui or textual);
torch is imported inside the functions, so run preparation pays for it only when it extends.

`prepare_vocabulary(preset, ...)` is the preset-level step (engine.prepare calls it before any data
is tokenized): extension per the `vocabulary` block, or a plain resize when a separately enriched
tokenizer has more ids than the model has rows (seed 004), cached by content.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable, Iterable, Literal

from engine.data.sources import DataError
from engine.layout import VOCAB_REPORT

__all__ = ["VocabError", "extend_vocabulary", "resize_embeddings", "prepare_vocabulary", "fertility",
           "chars_per_token", "init_kl", "changed_word_share"]

_HELDOUT_EVERY = 20  # without an explicit held-out target set, every 20th target text is held out


class VocabError(DataError, ValueError):
    """The inputs cannot be extended (wrong tokenizer kind, empty corpus, bad sizes). A DataError,
    so run preparation reports it as invalid input (exit 2)."""


# --------------------------------------------------------------------------- measures


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []


def fertility(tokenizer, texts: Iterable[str]) -> float:
    """Tokens per whitespace-separated word (lower = the tokenizer knows the language better)."""
    texts = list(texts)
    words = sum(len(t.split()) for t in texts)
    return sum(map(len, _encode(tokenizer, texts))) / max(words, 1)


def chars_per_token(tokenizer, texts: Iterable[str]) -> float:
    """Characters per token (higher = more text per token, i.e. shorter sequences)."""
    texts = list(texts)
    return sum(map(len, texts)) / max(sum(map(len, _encode(tokenizer, texts))), 1)


def _tokens_per_word(tokenizer, text: str) -> list[tuple[int, ...]]:
    """The token ids of `text` grouped by whitespace word (fast tokenizers: uses offsets)."""
    enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    groups: list[list[int]] = [[] for _ in range(len(ends) + 1)]  # +1: trailing whitespace tokens
    for tid, (start, _) in zip(enc.ids, enc.offsets):
        # A token belongs to the first word ending after it starts: "Ġword" and a run of
        # spaces before a word both go with that word.
        groups[bisect.bisect_right(ends, start)].append(tid)
    return [tuple(g) for g in groups[: len(ends)]]


def changed_word_share(tokenizer_old, tokenizer_new, texts: Iterable[str]) -> float:
    """Share of whitespace words whose token ids differ between the two tokenizers."""
    changed = total = 0
    for text in texts:
        old, new = _tokens_per_word(tokenizer_old, text), _tokens_per_word(tokenizer_new, text)
        total += len(old)
        changed += len(old) if len(old) != len(new) else sum(a != b for a, b in zip(old, new))
    return changed / max(total, 1)


def init_kl(base_model, ext_model, tokenizer_old, tokenizer_new, texts: Iterable[str], *, max_texts: int = 64,
            max_length: int = 256) -> dict:
    """How much the extended model, at initialisation, differs from the base on original text.

    Each text is tokenized by both tokenizers (with their special tokens); positions are compared
    over the common prefix of the two id sequences, where both models see the same context.
    At each position, with p = softmax(base logits) over the old vocabulary V_old and
    q = softmax(extended logits) over all rows:

    - `kl`: KL(p ‖ q restricted to V_old and renormalised), in nats per token. It is ~0 by
      construction when old rows are untouched and the tokenization is preserved, so a non-zero
      value flags moved ids, overwritten old rows or changed tokenization.
    - `new_mass`: sum of q over the rows >= |V_old| (new tokens and padding): the probability the
      model now diverts to tokens it has never seen, the real disturbance of the init;
      `pad_mass` is the part of it on padding rows (>= len(tokenizer_new)), which no text produces.
    - `kl_unnormalised`: KL(p ‖ q on V_old, not renormalised) = kl - log(1 - new_mass) per token.

    Returns means over positions plus the number of positions and texts compared.
    """
    import torch

    with torch.no_grad():
        return _init_kl(base_model, ext_model, tokenizer_old, tokenizer_new, texts, max_texts, max_length)


def _init_kl(base_model, ext_model, tokenizer_old, tokenizer_new, texts, max_texts, max_length) -> dict:
    import torch

    old_v = base_model.get_output_embeddings().weight.shape[0]
    n_tok = len(tokenizer_new)
    kl = kl_raw = mass = pad = 0.0
    n_pos = n_texts = 0
    for text in itertools.islice(texts, max_texts):
        a = tokenizer_old(text, truncation=True, max_length=max_length)["input_ids"]
        b = tokenizer_new(text, truncation=True, max_length=max_length)["input_ids"]
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if n == 0:
            continue
        ids = torch.tensor([a[:n]])
        logp = torch.log_softmax(base_model(ids).logits[0].float(), -1)
        logq_all = torch.log_softmax(ext_model(ids).logits[0].float(), -1)
        logq_old = logq_all[:, :old_v]
        kl_raw_t = (logp.exp() * (logp - logq_old)).sum(-1)
        log_old_mass = torch.logsumexp(logq_old, -1)  # log(1 - new_mass)
        kl += (kl_raw_t + log_old_mass).sum().item()  # renormalising q adds log(old mass)
        kl_raw += kl_raw_t.sum().item()
        mass += (1 - log_old_mass.exp()).sum().item()
        pad += logq_all[:, n_tok:].exp().sum().item()
        n_pos += n
        n_texts += 1
    d = max(n_pos, 1)
    return {"kl": kl / d, "new_mass": mass / d, "pad_mass": pad / d, "kl_unnormalised": kl_raw / d,
            "positions": n_pos, "texts": n_texts}


# --------------------------------------------------------------------------- tokenizer


def _load_base_tokenizer(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if not getattr(tok, "is_fast", False):
        raise VocabError(f"base tokenizer at {path} is a slow (Python) tokenizer ({type(tok).__name__}); vocabulary "
                         "extension needs a fast tokenizer (tokenizer.json) with a byte-level BPE model, "
                         "e.g. Llama-3, SmolLM2, GPT-2")
    spec = json.loads(tok.backend_tokenizer.to_str())
    kind = spec["model"].get("type", "unknown")
    if kind != "BPE":
        raise VocabError(f"base tokenizer at {path} is {kind}; merging new tokens is supported for BPE tokenizers "
                         "only (byte-level BPE, e.g. Llama-3, SmolLM2, GPT-2)")
    if '"ByteLevel"' not in json.dumps(spec.get("pre_tokenizer")):
        # SentencePiece-style BPE (Llama-2, Mistral v1) splits words differently: training
        # compatible tokens would need its own pre-tokenization, which is not implemented.
        raise VocabError(f"base tokenizer at {path} is BPE without a ByteLevel pre-tokenizer (SentencePiece-style); "
                         "only byte-level BPE tokenizers are supported (e.g. Llama-3, SmolLM2, GPT-2)")
    return tok, spec


def _train_target_merges(spec: dict, texts: list[str], vocab_size: int, min_frequency: int):
    """Train BPE on the target texts with the base's normalizer and pre-tokenizer: returns
    (merges in training order, whether the trainer ran out of pairs before `vocab_size`)."""
    from tokenizers import Tokenizer
    from tokenizers.pre_tokenizers import ByteLevel
    from tokenizers.trainers import BpeTrainer

    proto = dict(spec, added_tokens=[], post_processor=None,
                 model=dict(spec["model"], vocab={}, merges=[], dropout=None))
    tk = Tokenizer.from_str(json.dumps(proto))
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                         special_tokens=[], initial_alphabet=ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
              for m in json.loads(tk.to_str())["model"]["merges"]]
    return merges, tk.get_vocab_size() < vocab_size


def _select_new(base_vocab: dict, merges: list[tuple[str, str]], want: int):
    """New tokens in the trainer's merge order, each with the merge that builds it. A merge is
    kept only if both parts already exist (in the base or as earlier new tokens): then the
    token is reachable. Tokens the base already has are skipped, with their merge, so the base
    keeps its own way of producing them."""
    have = set(base_vocab)
    new: list[tuple[str, str]] = []
    for a, b in merges:
        if len(new) >= want:
            break
        if a + b not in have and a in have and b in have:
            have.add(a + b)
            new.append((a, b))
    return new


def _byte_text(token: str) -> str:
    """The text a byte-level token stands for (may hold U+FFFD for a partial UTF-8 sequence)."""
    from tokenizers.decoders import ByteLevel

    return ByteLevel().decode([token])


# --------------------------------------------------------------------------- embeddings


def _resize_mean(model, n_ids: int, pad_to_multiple_of: int):
    """Resize the embeddings to `n_ids` rows padded to a multiple; every added row (input and, if
    untied, output) = mean of the old rows, i.e. HF's mean_resizing without its noise, so the
    result is deterministic. Returns (input weight, output weight or None, tied)."""
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    out_emb = model.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model.resize_token_embeddings(n_ids, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
    inp = model.get_input_embeddings().weight
    out = model.get_output_embeddings().weight if out_emb is not None else None
    if tied and out.data_ptr() != inp.data_ptr():
        raise VocabError("resize_token_embeddings untied the input and output embeddings")
    with torch.no_grad():
        for w in [inp] if tied or out is None else [inp, out]:
            w[old:] = w[:old].float().mean(0).to(w.dtype)
    return inp, out, tied


def resize_embeddings(base_model_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, *,
                      pad_to_multiple_of: int = 64) -> dict:
    """A model whose tokenizer has more ids than it has embedding rows (a separately enriched
    tokenizer, e.g. seed 004's Kannada Llama-2 tokenizer): add the rows, each = mean of the old
    rows (no old tokenizer to take subwords from). Saves model + tokenizer to `out_dir`; returns
    the report (also out_dir/vocab_report.json)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_model_dir))
    old = model.get_input_embeddings().weight.shape[0]
    if len(tok) <= old:
        raise VocabError(f"the tokenizer has {len(tok)} ids and the model {old} embedding rows: nothing to resize")
    inp, _, tied = _resize_mean(model, len(tok), pad_to_multiple_of)
    model.config.cpt_old_vocab_size = old
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    report = {"kind": "resize", "tokens_added": len(tok) - old, "old_vocab_size": old, "new_vocab_size": len(tok),
              "padded_vocab_size": inp.shape[0], "first_new_id": old, "tied_embeddings": tied, "init": "mean of all rows"}
    (out_dir / VOCAB_REPORT).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


# --------------------------------------------------------------------------- main


def extend_vocabulary(
    base_model_dir: str | Path,
    base_tokenizer_dir: str | Path,
    target_texts: Iterable[str],
    out_dir: str | Path,
    *,
    new_tokens: int | None = None,
    target_vocab_size: int | None = None,
    min_frequency: int = 2,
    output_init: Literal["mean", "first_subword"] = "mean",
    pad_to_multiple_of: int = 64,
    heldout_target: list[str] | None = None,
    heldout_original: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Extend a byte-level BPE tokenizer + causal LM with target-language tokens; save to `out_dir`.

    Give exactly one of `new_tokens` (tokens to add) or `target_vocab_size` (the extended
    tokenizer's length). New ids come after every existing id and after the model's embedding
    rows (`old_vocab_size`), so rows >= old_vocab_size are exactly the new ones.

    Embedding init (rows >= old_vocab_size):
    - a new token's input row = mean of the old input rows of the subwords the old tokenizer gives
      for its text; output row (untied) = the same mean (`mean`) or the first subword's row
      (`first_subword`, EEVE); tied models keep one shared matrix;
    - padding rows (beyond the tokenizer, up to a multiple of `pad_to_multiple_of`) and any
      unused ids = mean of all old rows (input and output), i.e. HF's mean_resizing without noise;
      the tokenizer never produces them.

    Held-out sets: `heldout_target` defaults to every 20th target text (removed from training);
    `heldout_original` defaults to standard-library docstrings (English), so pass text in the
    base's real languages. Returns the report, also written to out_dir/vocab_report.json.
    """
    if output_init not in ("mean", "first_subword"):
        raise VocabError(f"output_init must be 'mean' or 'first_subword', not {output_init!r}")
    if (new_tokens is None) == (target_vocab_size is None):
        raise VocabError("give exactly one of new_tokens or target_vocab_size")
    out_dir = Path(out_dir)
    tok_old, spec = _load_base_tokenizer(base_tokenizer_dir)

    texts = [t for t in target_texts if t and t.strip()]
    if heldout_target is None and len(texts) >= _HELDOUT_EVERY:
        heldout_target = texts[_HELDOUT_EVERY - 1::_HELDOUT_EVERY]
        del texts[_HELDOUT_EVERY - 1::_HELDOUT_EVERY]
    if not texts:
        raise VocabError("the target-language corpus is empty: nothing to learn new tokens from")
    target_is_train = not heldout_target
    heldout_target = list(heldout_target or texts)  # tiny corpora: measured on the training text

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_model_dir))
    old_vocab_size = model.get_input_embeddings().weight.shape[0]
    # The first new id: after every tokenizer id (added/special tokens above the BPE vocab keep
    # theirs) and after every embedding row, so no old id or row ever moves.
    base_ids = list(spec["model"]["vocab"].values()) + [t["id"] for t in spec["added_tokens"]]
    n_ids = max(base_ids) + 1
    start = max(n_ids, old_vocab_size)
    want = new_tokens if new_tokens is not None else target_vocab_size - start
    if want <= 0:
        raise VocabError(f"target_vocab_size={target_vocab_size} leaves no room for new tokens: the base already "
                         f"uses {start} ids")

    # Train, growing the trainer's vocabulary until `want` tokens are new to the base or the
    # corpus runs out of pairs seen >= min_frequency times.
    size = 256 + 2 * want
    for _ in range(6):
        merges, exhausted = _train_target_merges(spec, texts, size, min_frequency)
        chosen = _select_new(spec["model"]["vocab"], merges, want)
        if len(chosen) >= want or exhausted:
            break
        size += 2 * (want - len(chosen))
    if len(chosen) < want:
        msg = (f"only {len(chosen)} new tokens found in the target corpus, {want} requested "
               f"(min_frequency={min_frequency}): give more target text or ask for fewer tokens")
        log(msg)
        warnings.warn(msg, stacklevel=2)

    # Merge into the base tokenizer JSON: vocab entries + merges appended (lowest priority).
    vocab = spec["model"]["vocab"]
    # `tokenizers` re-numbers added tokens that are absent from the model vocab on load
    # (model size + k), which would hand them the new ids: so the model vocab must cover every id
    # below `start`. Added tokens go in with their own ids (as GPT-2's <|endoftext|> already is;
    # the added-token matcher still claims them first), holes get unreachable fillers.
    for t in spec["added_tokens"]:
        vocab.setdefault(t["content"], t["id"])
    used = set(vocab.values())
    for i in range(start):
        if i not in used:
            vocab[f"<|cpt_reserved_{i}|>"] = i
    str_merges = bool(spec["model"]["merges"]) and isinstance(spec["model"]["merges"][0], str)
    for i, (a, b) in enumerate(chosen):
        vocab[a + b] = start + i
        spec["model"]["merges"].append(f"{a} {b}" if str_merges else [a, b])
    new_ids = list(range(start, start + len(chosen)))

    # Save through the base's own class (keeps its special tokens, chat template, bos/eos rules),
    # then swap in the merged tokenizer.json and reload it the way users will.
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    tok_old.save_pretrained(str(out_dir))
    (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    tok_new = AutoTokenizer.from_pretrained(str(out_dir))
    moved = {t: i for t, i in tok_old.get_vocab().items() if tok_new.convert_tokens_to_ids(t) != i}
    if moved or len(tok_new) != start + len(chosen):
        raise VocabError(f"merged tokenizer is inconsistent: {len(tok_new)} ids (expected {start + len(chosen)}), "
                         f"{len(moved)} old tokens moved, e.g. {list(moved)[:5]}")

    # Embeddings.
    import torch

    inp, out, tied = _resize_mean(model, len(tok_new), pad_to_multiple_of)
    padded = inp.shape[0]
    old_backend = tok_old.backend_tokenizer.model
    subwords = [[t.id for t in old_backend.tokenize(a + b)] for a, b in chosen]
    with torch.no_grad():
        for tid, sub in zip(new_ids, subwords):
            inp[tid] = inp[sub].float().mean(0).to(inp.dtype)
            if out is not None and not tied:
                out[tid] = (out[sub].float().mean(0) if output_init == "mean" else out[sub[0]]).to(out.dtype)
    model.config.cpt_old_vocab_size = old_vocab_size
    model.save_pretrained(str(out_dir))
    tok_new.save_pretrained(str(out_dir))

    # Report.
    if heldout_original is None:
        from engine.data.builtin import stdlib_prose

        heldout_original = list(itertools.islice(stdlib_prose(), 0, 4000, 20))
        log("no heldout_original given: measuring original-language preservation on stdlib docstrings (English)")
    # A second copy of the base, for init_kl only (in its saved dtype; freed on return).
    base_model = AutoModelForCausalLM.from_pretrained(str(base_model_dir)).eval()
    model.eval()
    report = {
        "kind": "extend",
        "tokens_added": len(chosen),
        "requested": want,
        "old_vocab_size": old_vocab_size,
        "new_vocab_size": len(tok_new),
        "padded_vocab_size": padded,
        "first_new_id": start,
        "tied_embeddings": tied,
        "output_init": output_init,
        "fertility": {
            "target": {"before": fertility(tok_old, heldout_target), "after": fertility(tok_new, heldout_target)},
            "original": {"before": fertility(tok_old, heldout_original), "after": fertility(tok_new, heldout_original)},
        },
        "chars_per_token": {
            "target": {"before": chars_per_token(tok_old, heldout_target),
                       "after": chars_per_token(tok_new, heldout_target)},
            "original": {"before": chars_per_token(tok_old, heldout_original),
                         "after": chars_per_token(tok_new, heldout_original)},
        },
        "heldout_target_is_train": target_is_train,
        "original_changed_word_share": changed_word_share(tok_old, tok_new, heldout_original),
        "init_kl": init_kl(base_model, model, tok_old, tok_new, heldout_original),
        "sample_new_tokens": [_byte_text(a + b) for a, b in chosen[:20]],
    }
    f = report["fertility"]["target"]
    log(f"vocabulary: +{len(chosen)} tokens ({old_vocab_size} -> {len(tok_new)} ids, {padded} rows); target "
        f"fertility {f['before']:.2f} -> {f['after']:.2f}; original words changed "
        f"{report['original_changed_word_share']:.2%}; init new-token mass {report['init_kl']['new_mass']:.3f}")
    if report["original_changed_word_share"] > 0.01:
        msg = (f"extension changes the tokenization of {report['original_changed_word_share']:.1%} of original-language "
               "words (> 1%)")
        log(msg)
        warnings.warn(msg, stacklevel=2)
    (out_dir / VOCAB_REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    return report


# --------------------------------------------------------------------------- preset step

_STEP_VERSION = 1
_ORIGINAL_DOCS, _ORIGINAL_EVERY = 200, 5  # held-out original text: every 5th document, at most 200


def _texts(preset, names: list[str], max_chars: int, every: int = 1, max_docs: int | None = None) -> list[str]:
    from engine.data.sources import read_documents

    out, n = [], 0
    for name in names:
        for i, doc in enumerate(read_documents(preset.sources[name], name)):
            if i % every:
                continue
            out.append(doc)
            n += len(doc)
            if n >= max_chars or (max_docs and len(out) >= max_docs):
                return out
    return out


def _model_identity(model_dir: Path) -> str:
    """Content key of a model directory: small files by content (a model built from a config in
    each run dir is byte-identical), large ones by size and mtime (hashing 16 GB is too slow)."""
    h = hashlib.sha256()
    if not model_dir.is_dir():  # a hub id resolved from the local cache
        return str(model_dir)
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f.name.encode())
            h.update(f.read_bytes() if st.st_size < 64 << 20 else f"{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest()


def _link_tree(src: Path, dst: Path) -> None:
    """dst = a copy of src made of hard links (no extra space; files are never written in place)."""
    shutil.rmtree(dst, ignore_errors=True)

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:  # another filesystem
            shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link)


def prepare_vocabulary(preset, model_dir: str | Path, tokenizer_dir: str | Path, cache: Path, out_dir: Path,
                       log: Callable[[str], None] = print) -> dict | None:
    """The embedding step of run preparation, run before any data is tokenized.

    - the preset has a `vocabulary` block: extend_vocabulary on its target sources (held-out
      original text: `original_sources`, else stdlib docstrings);
    - else, the tokenizer has more ids than the model has rows: resize_embeddings (mean init);
    - else nothing: returns None.
    The result is built once per content key (base tokenizer + model, corpora, settings) under
    cache/vocab/KEY and hard-linked to `out_dir`. Returns {"model_dir", "tokenizer_dir",
    "old_vocab_size", "report", "cached"}.
    """
    from engine.data.pack import source_fingerprint, tokenizer_fingerprint

    spec = preset.vocabulary
    tok_dir, model_dir = Path(tokenizer_dir), Path(model_dir)
    if spec is None:
        from transformers import AutoTokenizer

        cfg_file = model_dir / "config.json"  # a hub id (not a directory) is not checked
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        rows = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
        if not rows or len(AutoTokenizer.from_pretrained(str(tok_dir))) <= rows:
            return None
    names = (spec.sources + spec.original_sources) if spec else []
    key = hashlib.sha256(json.dumps({
        "v": _STEP_VERSION, "spec": spec.model_dump(mode="json") if spec else "resize",
        "tokenizer": tokenizer_fingerprint(tok_dir) if tok_dir.exists() else str(tok_dir),
        "model": _model_identity(model_dir),
        "sources": {n: source_fingerprint(preset.sources[n], "") for n in names},
    }, sort_keys=True).encode()).hexdigest()[:16]
    built = cache / "vocab" / key
    cached = (built / VOCAB_REPORT).exists()
    if not cached:
        tmp = built.with_name(f"{key}.tmp-{os.getpid()}")  # per process: two runs may build the same key
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if spec is None:
                log("the tokenizer has more ids than the model has embedding rows: resizing (mean init)")
                resize_embeddings(model_dir, tok_dir, tmp)
            else:
                log(f"extending the vocabulary on {', '.join(spec.sources)}")
                target = _texts(preset, spec.sources, spec.max_chars)
                original = (_texts(preset, spec.original_sources, 10 ** 9, _ORIGINAL_EVERY, _ORIGINAL_DOCS)
                            if spec.original_sources else None)
                with warnings.catch_warnings():  # the same messages go to `log`
                    warnings.simplefilter("ignore")
                    extend_vocabulary(model_dir, tok_dir, target, tmp, new_tokens=spec.new_tokens,
                                      target_vocab_size=spec.target_vocab_size, min_frequency=spec.min_frequency,
                                      output_init=spec.output_init, pad_to_multiple_of=spec.pad_to_multiple_of,
                                      heldout_original=original, log=log)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            tmp.rename(built)  # atomic: a directory with a report is complete
        except OSError:
            if not (built / VOCAB_REPORT).exists():
                raise
            shutil.rmtree(tmp)  # another process finished the same build first
    report = json.loads((built / VOCAB_REPORT).read_text(encoding="utf-8"))
    _link_tree(built, out_dir)
    return {"model_dir": str(out_dir), "tokenizer_dir": str(out_dir), "old_vocab_size": report["old_vocab_size"],
            "report": report, "cached": cached}

