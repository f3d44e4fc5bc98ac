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

from engine.data.pack import Tokenizer, prepare_source, tokenizer_fingerprint, write_json_atomic
from engine.data.sources import DataError, expand_path, read_documents
from engine.events import EventWriter
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

    out = run_dir / "base_model"
    if not (out / "config.json").exists():
        ev.emit("progress", step="model", message="building the model from its config")
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        build_from_config(preset.model.config, len(tok), out, preset.seed, tokenizer=tok)
    return out


def used_sources(preset: Preset) -> list[str]:
    names = []
    for st in preset.stages:
        for s, w in preset.mixture_of(st).weights.items():
            if s not in names:
                names.append(s)
    return names


def prepare(run_dir: Path, cache: Path) -> dict:
    preset = load_preset(run_dir / "preset.yaml")
    ev = EventWriter(run_dir / "prepare" / "events.jsonl", "prepare")
    ev.emit("status", state="running")
    t0 = time.time()
    tok_dir = _tokenizer_dir(preset, cache, run_dir, ev)
    model_dir = _base_model_dir(preset, tok_dir, run_dir, ev)
    tok = Tokenizer(tok_dir, preset.tokenizer.add_bos)
    tok_fp = tokenizer_fingerprint(tok_dir) if Path(tok_dir).exists() else str(tok_dir)
    sources = {}
    for name in used_sources(preset):
        spec = preset.sources[name]
        out = cache / "prepared" / f"{name}-{hashlib.sha256(spec.path.encode()).hexdigest()[:8]}"
        ev.emit("progress", step="data", source=name, message=f"preparing source {name}")
        man = prepare_source(spec, name, tok, out, tok_fp)
        sources[name] = {"dir": str(out), "domain": spec.domain or name,
                         "train_tokens": man["train"]["tokens"], "val_tokens": man["val"]["tokens"],
                         "documents": man["documents"], "skipped": man["skipped"]}
        ev.emit("progress", step="data", source=name, tokens=man["train"]["tokens"] + man["val"]["tokens"],
                documents=man["documents"], skipped=man["skipped"])
    prepared = {"tokenizer_dir": str(tok_dir), "model_dir": str(model_dir), "sources": sources,
                "vocab_size": tok.vocab_size, "seconds": time.time() - t0}
    write_json_atomic(run_dir / "prepared.json", prepared)
    ev.emit("status", state="done")
    ev.close()
    return prepared


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.prepare")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--cache", type=Path, default=None)
    a = ap.parse_args(argv)
    cache = a.cache or a.run_dir / "cache"
    try:
        prepare(a.run_dir, cache)
    except (DataError, PresetError) as e:
        EventWriter(a.run_dir / "prepare" / "events.jsonl", "prepare").emit("status", state="failed", reason=str(e))
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
