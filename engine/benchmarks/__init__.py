"""A small local lm-eval task set for the tiny demo: no download, deterministic, from the Python stdlib.

    write_local_tasks(DIR) -> DIR          an lm-eval include path holding
      cpt_mc_prose.yaml + .jsonl           multiple choice: the opening words of a docstring, pick its real
                                           continuation among 3 continuations of other docstrings (acc, acc_norm)
      cpt_ppl_code.yaml + .jsonl           loglikelihood_rolling over stdlib source (word/byte perplexity, bits/byte)
      cpt_ppl_prose.yaml + .jsonl          loglikelihood_rolling over stdlib docstrings
      manifest.json                        Python version, example counts, sha256 of each data file
    All three carry the tag `cpt_local` (so `--tasks cpt_local` runs them all).

The YAMLs are the templates beside this file (*.yaml.in) with `@DATA_DIR@` replaced by the absolute path
of DIR: lm-eval hands `dataset_kwargs.data_files` to `datasets.load_dataset("json", ...)`, which resolves a
relative path against the process's working directory, not the YAML's folder, so relative paths would
break as soon as lm-eval runs from elsewhere. Absolute paths make the written folder usable from any cwd
by both `python -m engine.evaluate` and the `lm_eval` CLI (`--include_path DIR`). Move the folder and it
must be written again (write_local_tasks is cheap: ~1 s).

The text comes from engine/data/builtin.py (standard-library files in sorted order, parsed with `ast`), so
a given Python version always writes the same bytes. NB the tiny demo also *trains* on stdlib prose and
code: these are in-distribution probes of what a stage learned and forgot, not held-out benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from pathlib import Path

from engine.data.builtin import stdlib_code, stdlib_prose

TEMPLATES = Path(__file__).resolve().parent
TASKS = ("cpt_mc_prose", "cpt_ppl_code", "cpt_ppl_prose")
TAG = "cpt_local"
SEED = 1234

N_MC = 200          # multiple-choice items
N_PPL = 64          # documents per perplexity task
MC_CONTEXT_WORDS = 10
MC_CONT_WORDS = 6
MC_CHOICES = 4
PPL_MIN_CHARS, PPL_MAX_CHARS = 200, 800


def _spread(items: list, n: int) -> list:
    """n items evenly spread over the (sorted, deterministic) list, so all of the stdlib is sampled."""
    if len(items) <= n:
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def _dedup(texts) -> list[str]:
    seen, out = set(), []
    for t in texts:
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def mc_prose_items(prose=None, n: int = N_MC, seed: int = SEED) -> list[dict]:
    """{"query", "choices", "gold"} items: the first paragraph of a docstring split into an opening of
    MC_CONTEXT_WORDS words and the next MC_CONT_WORDS words; the distractors are the same-length
    continuations of other (randomly chosen) items."""
    cands = []
    for doc in _dedup(stdlib_prose() if prose is None else prose):
        para = " ".join(doc.split("\n\n", 1)[0].split())
        words = para.split(" ")
        if len(words) < MC_CONTEXT_WORDS + MC_CONT_WORDS or not re.match(r"^[A-Za-z]", para):
            continue
        q = " ".join(words[:MC_CONTEXT_WORDS])
        c = " ".join(words[MC_CONTEXT_WORDS:MC_CONTEXT_WORDS + MC_CONT_WORDS])
        cands.append((q, c))
    # one item per distinct opening (stdlib has many near-identical docstrings)
    by_q = {}
    for q, c in cands:
        by_q.setdefault(q, c)
    cands = _spread(list(by_q.items()), n)
    rng = random.Random(seed)
    conts = [c for _, c in cands]
    items = []
    for i, (q, c) in enumerate(cands):
        pool = [x for j, x in enumerate(conts) if j != i and x != c]
        choices = rng.sample(sorted(set(pool)), MC_CHOICES - 1)
        gold = rng.randrange(MC_CHOICES)
        choices.insert(gold, c)
        items.append({"query": q, "choices": choices, "gold": gold})
    return items


def ppl_items(texts, n: int = N_PPL) -> list[dict]:
    docs = [t for t in _dedup(texts) if PPL_MIN_CHARS <= len(t) <= PPL_MAX_CHARS]
    return [{"text": t} for t in _spread(docs, n)]


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return hashlib.sha256(data).hexdigest()


def write_local_tasks(out_dir: str | Path) -> Path:
    """Write the local task set (YAMLs + jsonl + manifest.json) into `out_dir`; returns it (absolute),
    to pass as lm-eval's include path. Idempotent: same bytes for the same Python version."""
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    prose = list(stdlib_prose())
    data = {
        "cpt_mc_prose": mc_prose_items(prose),
        "cpt_ppl_code": ppl_items(stdlib_code()),
        "cpt_ppl_prose": ppl_items(prose),
    }
    manifest = {"python": sys.version.split()[0], "seed": SEED, "tasks": {}}
    for name in TASKS:
        tpl = TEMPLATES / f"{name}.yaml.in"
        if not tpl.exists():
            raise FileNotFoundError(f"{tpl} is missing: engine/benchmarks/*.yaml.in must be installed with the "
                                    "engine package (package-data)")
        digest = _write_jsonl(out / f"{name}.jsonl", data[name])
        # JSON string escaping makes any path a valid YAML double-quoted scalar.
        text = tpl.read_text().replace('"@DATA_DIR@/', json.dumps(str(out) + "/")[:-1])
        (out / f"{name}.yaml").write_text(text)
        manifest["tasks"][name] = {"examples": len(data[name]), "sha256": digest}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out

