"""`cpt-tui vocab PRESET [--out DIR] [--json]`: only the vocabulary step of a preset.

The work runs in `python -m engine.prepare DIR --vocab-only` (this process never imports torch).
DIR is laid out like a run directory: DIR/preset.yaml, DIR/prepare/events.jsonl, and the extended
model + tokenizer with its report in DIR/vocab/ (vocab_report.json). Same cache as runs: a second
call with the same base, corpus and settings does no work.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cpt_tui import paths
from cpt_tui.cli.common import EXIT_FAILED, EXIT_INVALID
from cpt_tui.presets import Invalid, load_checked
from engine.layout import RunLayout


def _needed_paths_missing(preset) -> list[tuple[str, str]]:
    """missing_paths() restricted to what the vocabulary step reads (not the stages' data)."""
    from engine.plan import missing_paths

    v = preset.vocabulary
    needed = set(v.sources + v.original_sources + (preset.tokenizer.train.sources if preset.tokenizer.train else []))
    keep = {"model.path", "tokenizer.path"} | {f"sources.{n}.path" for n in needed}
    return [(yp, msg) for yp, msg in missing_paths(preset) if yp in keep]


def cmd_vocab(a) -> int:
    from cpt_tui.lifecycle import engine_env as _engine_env
    from engine.spec import preset_error_at

    path, preset, _ = load_checked(a.preset, check_paths=False)
    if preset.vocabulary is None:
        raise Invalid(f"{path}: the preset has no `vocabulary` block: nothing to extend")
    missing = _needed_paths_missing(preset)
    if missing:
        yp, msg = missing[0]
        raise Invalid(str(preset_error_at(path, yp, msg)) + "\n  (fix this path; nothing was started)")
    out = Path(a.out) if a.out else paths.home() / "vocab" / f"{time.strftime('%Y%m%d-%H%M%S')}-{preset.name}"
    layout = RunLayout(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, layout.preset)
    if not a.json:
        print(f"vocabulary extension for {preset.name} in {out} ...", flush=True)
    argv = [sys.executable, "-m", "engine.prepare", str(out), "--cache", str(paths.cache_dir()), "--vocab-only"]
    r = subprocess.run(argv, env=_engine_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True)
    (out / "vocab.log").write_text(r.stdout + r.stderr)
    if r.returncode == EXIT_INVALID:  # bad input: engine.prepare's last words are "error: <message>"
        lines = r.stderr.splitlines()
        first = max((i for i, l in enumerate(lines) if l.startswith("error: ")), default=0)
        raise Invalid("\n".join(lines[first:]).removeprefix("error: ").strip())
    if r.returncode:
        tail = "\n".join(r.stderr.strip().splitlines()[-12:])
        print(f"error: the vocabulary step failed (exit {r.returncode}); log: {out / 'vocab.log'}\n{tail}",
              file=sys.stderr)
        return EXIT_FAILED
    report = json.loads(layout.vocab_report.read_text(encoding="utf-8"))
    if a.json:
        print(json.dumps({"dir": str(layout.vocab), "report": report}, indent=1, ensure_ascii=False))
    else:
        print(format_report(report))
        print(f"\nextended model + tokenizer: {layout.vocab}")
    return 0


def format_report(report: dict) -> str:
    """The report as a readable table (cpt-tui vocab, logs)."""
    lines = [f"tokens added      {report['tokens_added']:,}" + (
        f" (requested {report['requested']:,})" if report.get("requested", report["tokens_added"]) !=
        report["tokens_added"] else ""),
        f"vocabulary        {report['old_vocab_size']:,} -> {report['new_vocab_size']:,} ids "
        f"({report['padded_vocab_size']:,} embedding rows), first new id {report['first_new_id']:,}",
        "new rows          " + ("mean of all old rows" if report.get("kind") != "extend" else
                                 "input: mean of the old subwords; output: "
                                 + ("the same tensor (tied)" if report["tied_embeddings"] else report["output_init"]))]
    if report.get("kind") != "extend":
        return "\n".join(lines)
    lines += ["", f"{'measure (held-out text)':<28} {'before':>8} {'after':>8} {'change':>8}"]
    for measure, label in (("fertility", "tokens/word"), ("chars_per_token", "chars/token")):
        for lang in ("target", "original"):
            v = report[measure][lang]
            ch = v["after"] / v["before"] - 1 if v["before"] else 0.0
            lines.append(f"{label + ' ' + lang:<28} {v['before']:>8.3f} {v['after']:>8.3f} {ch:>+8.1%}")
    k = report["init_kl"]
    lines += ["",
              f"original words re-tokenized  {report['original_changed_word_share']:.3%} (warned above 1%)",
              f"init KL(base || extended)    {max(k['kl'], 0.0):.2e} nats/token over the old vocabulary "
              f"({k['positions']:,} positions of {k['texts']} texts)",
              f"init mass on new rows        {k['new_mass']:.4f} (padding {k['pad_mass']:.4f}); "
              f"unnormalised KL {k['kl_unnormalised']:.4f}"]
    if report.get("heldout_target_is_train"):
        lines.append("note: the target corpus is small: fertility measured on the training text")
    whole = [t for t in report.get("sample_new_tokens", []) if "\ufffd" not in t]  # not partial UTF-8
    if whole:
        lines.append("sample new tokens: " + " ".join(repr(t) for t in whole[:12]))
    return "\n".join(lines)
