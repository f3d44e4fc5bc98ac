"""Run preparation: tokenizer, base model, token shards. `python -m engine.prepare RUN_DIR [--cache DIR]`.

Reads RUN_DIR/preset.yaml, writes RUN_DIR/prepared.json (what the stages need) and progress to
RUN_DIR/prepare/events.jsonl. Tokenizers and prepared sources are cached by content under the
cache directory, so a second run with the same inputs does no work.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from engine.data.pack import write_json_atomic
from engine.data.run import prepare_data, used_sources  # noqa: F401  (used_sources: API)
from engine.data.sources import DataError, expand_path, read_documents
from engine.events import EventWriter
from engine.layout import RunLayout
from engine.spec import Preset, PresetError, load_preset


def _tokenizer_dir(preset: Preset, cache: Path, run_dir: Path, ev: EventWriter) -> Path:
    tspec = preset.tokenizer
    if tspec.train is None:
        ref = tspec.path or preset.model.path
        p = Path(expand_path(ref))
        return p if p.exists() else Path(ref)  # a cached hub id: AutoTokenizer resolves it offline
    from engine.tokenizer import train_bpe

    key = hashlib.sha256(json.dumps([tspec.train.model_dump(), {s: preset.sources[s].model_dump()
                                     for s in tspec.train.sources}], sort_keys=True).encode()).hexdigest()[:16]
    out = cache / "tokenizers" / key
    if not (out / "tokenizer.json").exists():
        ev.emit("progress", step="tokenizer", message=f"training a BPE tokenizer ({tspec.train.vocab_size} tokens)")
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)

        def texts():
            for s in tspec.train.sources:  # round-robin would be fairer; sources are small here
                yield from read_documents(preset.sources[s], s)
        train_bpe(texts(), tspec.train.vocab_size, tmp, tspec.train.max_chars)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def _base_model_dir(preset: Preset, tok_dir: Path, run_dir: Path, ev: EventWriter) -> Path:
    if preset.model.path:
        p = Path(expand_path(preset.model.path))
        return p if p.exists() else Path(preset.model.path)
    from transformers import AutoTokenizer

    from engine.model import build_from_config

    out = RunLayout(run_dir).base_model
    if not (out / "config.json").exists():
        ev.emit("progress", step="model", message="building the model from its config")
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        build_from_config(preset.model.config, len(tok), out, preset.seed, tokenizer=tok)
    return out


def _vocabulary(preset: Preset, cache: Path, run_dir: Path, tok_dir, model_dir, ev: EventWriter) -> dict:
    """Vocabulary extension (or a resize for a tokenizer larger than the model), into RUN_DIR/vocab.
    Runs before any data is tokenized: the data must be tokenized with the extended tokenizer.
    Returns the prepared.json fields it sets ({} when there is nothing to do)."""
    from engine.vocab import prepare_vocabulary

    r = prepare_vocabulary(preset, model_dir, tok_dir, cache, RunLayout(run_dir).vocab,
                           log=lambda m: ev.emit("progress", step="vocabulary", message=m))
    if r is None:
        return {}
    rep = r["report"]
    msg = f"vocabulary: +{rep['tokens_added']} tokens, {rep['old_vocab_size']} -> {rep['new_vocab_size']} ids"
    if rep["kind"] == "extend":
        f = rep["fertility"]["target"]
        msg += (f"; target fertility {f['before']:.2f} -> {f['after']:.2f} tokens/word; original words changed "
                f"{rep['original_changed_word_share']:.2%}; init KL {max(rep['init_kl']['kl'], 0.0):.1e}")
    # A fresh extension has already logged the same summary: then the report goes without a message.
    said = rep["kind"] == "extend" and not r["cached"]
    ev.emit("progress", step="vocabulary", report=rep, **({} if said else {"message": msg + " (cached)" * r["cached"]}))
    if rep.get("requested", rep["tokens_added"]) > rep["tokens_added"]:
        ev.emit("warning", kind="vocabulary", message=f"only {rep['tokens_added']} new tokens found, "
                f"{rep['requested']} requested: give more target text or lower min_frequency")
    if rep.get("original_changed_word_share", 0) > 0.01:
        ev.emit("warning", kind="vocabulary", message=f"extension re-tokenizes "
                f"{rep['original_changed_word_share']:.1%} of original-language words (> 1%)")
    return {"tokenizer_dir": r["tokenizer_dir"], "model_dir": r["model_dir"],
            "old_vocab_size": r["old_vocab_size"], "vocabulary": rep}


def prepare(run_dir: Path, cache: Path, vocab_only: bool = False) -> dict:
    layout = RunLayout(run_dir)
    preset = load_preset(layout.preset)
    ev = EventWriter(layout.prepare_events, "prepare")
    ev.emit("status", state="running")
    t0 = time.time()
    tok_dir = _tokenizer_dir(preset, cache, run_dir, ev)
    model_dir = _base_model_dir(preset, tok_dir, run_dir, ev)
    vocab = _vocabulary(preset, cache, run_dir, tok_dir, model_dir, ev)
    tok_dir, model_dir = vocab.get("tokenizer_dir", tok_dir), vocab.get("model_dir", model_dir)
    if vocab_only:  # `cpt-tui vocab`: the report is in RUN_DIR/vocab/vocab_report.json
        ev.emit("status", state="done")
        ev.close()
        return vocab
    data = prepare_data(preset, tok_dir, model_dir, cache, ev.emit)  # engine.data.run
    prepared = {"tokenizer_dir": str(tok_dir), "model_dir": str(model_dir), **data, "seconds": time.time() - t0}
    prepared.update(vocab)
    write_json_atomic(layout.prepared, prepared)
    ev.emit("status", state="done")
    ev.close()
    return prepared


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.prepare")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--vocab-only", action="store_true", help="only the vocabulary step (cpt-tui vocab)")
    a = ap.parse_args(argv)
    cache = a.cache or RunLayout(a.run_dir).default_cache
    try:
        prepare(a.run_dir, cache, vocab_only=a.vocab_only)
    except (DataError, PresetError) as e:
        EventWriter(RunLayout(a.run_dir).prepare_events, "prepare").emit("status", state="failed", reason=str(e))
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
