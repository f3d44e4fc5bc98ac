"""Preparation of every source a preset's stages use (the data part of `python -m engine.prepare`),
and the light cache lookup `cpt-tui plan` uses to show epochs per source without preparing anything.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

from engine.data.pack import (FORMAT_VERSION, Tokenizer, prepared_dir, prepare_source, spec_fingerprint,
                              tokenizer_fingerprint)
from engine.data.sources import DataError, SourceReader
from engine.data.tokenize import EncodePool, default_workers
from engine.spec import Preset

# A model with this many more embedding rows than the tokenizer has ids was made for another
# tokenizer (real models pad by at most a few hundred rows: Qwen2.5 271, Phi-2 905).
_MAX_PADDING_ROWS, _MAX_PADDING_SHARE = 1024, 0.02


def used_sources(preset: Preset) -> list[str]:
    names: list[str] = []
    for st in preset.stages:
        for s in preset.mixture_of(st).weights:
            if s not in names:
                names.append(s)
    return names


def effective_spec(preset: Preset, name: str):
    """A source's spec as prepared: keep_boundaries is implied when a long_docs stage uses it."""
    spec = preset.sources[name]
    if not spec.keep_boundaries and any(st.long_docs and name in preset.mixture_of(st).weights for st in preset.stages):
        spec = spec.model_copy(update={"keep_boundaries": True})
    return spec


def check_vocab_size(tokenizer_len: int, model_dir: str | Path, tokenizer_dir: str | Path) -> None:
    """The tokenizer's ids must index the model's embedding, and belong to it: DataError otherwise."""
    cfg = Path(model_dir) / "config.json"
    if not cfg.exists():
        return
    c = json.loads(cfg.read_text())
    rows = c.get("vocab_size") or c.get("text_config", {}).get("vocab_size")
    if not rows:
        return
    if tokenizer_len > rows:
        raise DataError(f"tokenizer {tokenizer_dir} has {tokenizer_len:,} ids but model {model_dir} has vocab_size "
                        f"{rows:,}: ids >= {rows:,} would index past the embedding; use the model's own tokenizer "
                        "or extend the vocabulary (a `vocabulary:` block)")
    if rows - tokenizer_len > max(_MAX_PADDING_ROWS, _MAX_PADDING_SHARE * rows):
        raise DataError(f"tokenizer {tokenizer_dir} has {tokenizer_len:,} ids but model {model_dir} has vocab_size "
                        f"{rows:,}: the tokenizer belongs to another model; point tokenizer.path at the model's tokenizer")


def prepare_data(preset: Preset, tok_dir: str | Path, model_dir: str | Path, cache: Path,
                 emit: Callable[..., None]) -> dict:
    """Prepare every used source; returns the prepared.json fields for the data."""
    tok = Tokenizer(tok_dir, preset.tokenizer.add_bos)
    check_vocab_size(tok.vocab_size, model_dir, tok_dir)
    tok_fp = tok.fingerprint(tok_dir)
    pool: Optional[EncodePool] = None
    sources = {}
    try:
        for name in used_sources(preset):
            spec = effective_spec(preset, name)
            out = prepared_dir(cache, name, spec, tok_fp)
            if pool is None and default_workers(SourceReader(spec, name).total_bytes) > 1:
                pool = EncodePool(tok.encoder_args(), default_workers(1 << 40))  # shared by the large sources
            emit("progress", step="data", source=name, message=f"preparing source {name}")
            t0 = time.time()
            man = prepare_source(spec, name, tok, out, tok_fp, pool=pool,
                                 progress=lambda p: emit("progress", step="data", **p))
            sources[name] = {"dir": str(out), "domain": spec.domain or name,
                             "train_tokens": man["train"]["tokens"], "val_tokens": man["val"]["tokens"],
                             "documents": man["documents"], "skipped": man["skipped"]}
            skipped = sum(man["skipped"].values())
            emit("progress", step="data", source=name, done=True, tokens=man["train"]["tokens"] + man["val"]["tokens"],
                 documents=man["documents"], skipped=man["skipped"], seconds=time.time() - t0,
                 message=f"{name}: {man['train']['tokens']:,} train + {man['val']['tokens']:,} val tokens, "
                         f"{man['documents']:,} documents" + (f", {skipped:,} skipped" if skipped else ""))
            for w in (man.get("foreign") or {}).get("warnings", []):
                emit("warning", kind="data", source=name, message=w)
            for reason, n in man["skipped"].items():
                emit("warning", kind="data", source=name,
                     message=f"{name}: skipped {n:,} record(s): {reason} (first at {man['first_skipped'].get(reason)})")
    finally:
        if pool is not None:
            pool.close()
    stage_sources, long_docs = long_docs_views(preset, sources, emit)
    return {"sources": sources, "vocab_size": tok.vocab_size, "tokenizer_fingerprint": tok_fp,
            "data_format_version": FORMAT_VERSION, "stage_sources": stage_sources, "long_docs": long_docs}


def long_docs_views(preset: Preset, sources: dict, emit: Callable[..., None]) -> tuple[dict, dict]:
    """Per long_docs stage, a view of every source of its mixture (engine.data.longdocs), and the report:
    per source the long-document share available and realised, and how often long documents repeat."""
    from engine.data.longdocs import build_view
    from engine.data.mixture import plan_mixture
    views: dict = {}
    report: dict = {}
    for st in preset.stages:
        if not st.long_docs:
            continue
        mix = preset.mixture_of(st)
        views[st.name], report[st.name] = {}, {}
        for name in mix.weights:
            vdir, vman = build_view(Path(sources[name]["dir"]), st.long_docs.min_tokens, st.long_docs.share, preset.seed)
            views[st.name][name] = {"dir": str(vdir), "train_tokens": vman["train"]["tokens"]}
            report[st.name][name] = dict(vman["long_docs"])
        mp = plan_mixture(mix, {n: v["train_tokens"] for n, v in views[st.name].items()}, st.seq_len)
        for sp in mp.sources:
            r = report[st.name][sp.name]
            r["repeats"] = max(r["long_repeats"], 0) * sp.epochs
            warns = list(r.pop("warnings"))
            if r["repeats"] > mix.max_repeats:
                warns.append(f"long documents repeat {r['repeats']:.1f} times (more than max_repeats="
                             f"{mix.max_repeats:g}) to reach share {st.long_docs.share:g}: the source has "
                             f"{r['available_share']:.1%} long-document tokens; lower share or add long documents")
            r["warnings"] = warns
            emit("progress", step="data", source=sp.name, stage=st.name, long_docs=r,
                 message=f"{st.name}/{sp.name}: long documents (>= {st.long_docs.min_tokens:,} tokens) "
                         f"{r['available_share']:.1%} available -> {r['realised_share']:.1%} realised")
            for w in warns:
                emit("warning", kind="data", source=sp.name, message=f"{st.name}/{sp.name}: {w}")
    return views, report


def cached_train_tokens(preset: Preset, cache: Path) -> dict[str, int]:
    """Training tokens of the sources already prepared in `cache` (no tokenizer loaded, nothing read).

    A prepared source matches on its spec and files; if several tokenizers prepared it, the one of
    the preset's tokenizer directory wins (when it exists locally), else the newest.
    """
    tok_ref = preset.tokenizer.path or preset.model.path
    tok_fp = None
    try:
        from engine.data.sources import expand_path
        if tok_ref and (Path(expand_path(tok_ref)) / "tokenizer.json").exists():
            tok_fp = tokenizer_fingerprint(expand_path(tok_ref))
    except DataError:
        pass
    out: dict[str, int] = {}
    for name in used_sources(preset):
        try:
            sfp = spec_fingerprint(effective_spec(preset, name))
        except DataError:  # unset ${VAR} or missing files: not prepared here
            continue
        best = None
        for man_path, man in _cached_manifests(cache, name, sfp):
            rank = (bool(tok_fp) and man["tokenizer_fingerprint"].startswith(tok_fp), man_path.stat().st_mtime)
            if best is None or rank > best[0]:
                best = (rank, man["train"]["tokens"])
        if best is not None:
            out[name] = best[1]
    return out


def _cached_manifests(cache: Path, name: str, sfp: str):
    """(path, manifest) of each complete preparation of source `name` with spec fingerprint `sfp` in `cache`."""
    for man_path in (cache / "prepared").glob(f"{name}-*/manifest.json"):
        try:
            man = json.loads(man_path.read_text())
        except (OSError, ValueError):
            continue
        if man.get("spec_fingerprint") == sfp and man.get("format_version") == FORMAT_VERSION:
            yield man_path, man


def cached_long_docs(preset: Preset, cache: Path) -> dict:
    """The long_docs report (per stage, per source: available / realised share, repeats) from sources already
    prepared in `cache`, nothing prepared or built: for `cpt-tui plan` (engine.plan.resolve(long_docs=...))."""
    import numpy as np
    from engine.data.longdocs import plan_view
    from engine.data.pack import open_boundaries
    out: dict = {}
    for st in preset.stages:
        if not st.long_docs:
            continue
        for name in preset.mixture_of(st).weights:
            try:
                sfp = spec_fingerprint(effective_spec(preset, name))
            except DataError:
                continue
            for man_path, man in sorted(_cached_manifests(cache, name, sfp), key=lambda m: -m[0].stat().st_mtime):
                starts = open_boundaries(man_path.parent)
                if starts is None:
                    break
                lengths = np.diff(np.append(np.asarray(starts, dtype=np.int64), man["train"]["tokens"]))
                rep = plan_view(lengths, st.long_docs.min_tokens, st.long_docs.share, preset.seed)["report"]
                out.setdefault(st.name, {})[name] = rep
                break
    return out
