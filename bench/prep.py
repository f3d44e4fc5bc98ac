"""Benchmark of data preparation (not a test): `python bench/prep.py [--quick] [--mb 200] [--scale 10]`.

On one generated jsonl corpus (default 200 MB; --quick: 20 MB) with one trained byte-level BPE, on
the same cores, it prints:
  (a) cpt-tui preparation (engine.data.pack.prepare_source: read, tokenize in worker processes, pack, shards;
      the workers use the exact byte-level BPE fast path of engine.data.fastbpe when the tokenizer allows it)
  (b) Hugging Face `datasets`: load_dataset("json") + map(tokenize, batched=True, num_proc) + map(group_texts)
      with the itertools.chain group_texts of the current run_clm.py (PITFALLS #4: the fair baseline)
  (c) the raw limit: the tokenizer's own `encode_batch` (all cores, Rust threads) over the texts in memory
and `ratio prep/raw`, `ratio prep/hf`; then the peak RSS (process tree) of preparation on the corpus and
on a `--scale`× larger one (the same file hard-linked `scale` times: no extra disk, same content).
Wall-clock figures on a shared machine are noisy: CPU seconds are printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- corpus

def _words(rng, n=40000) -> np.ndarray:
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    p = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9,
                  1.5, 1.0, .8, .15, .15, .1, .07])
    lens = rng.integers(1, 11, n)
    chars = rng.choice(letters, int(lens.sum()), p=p / p.sum())
    ends = np.cumsum(lens)
    return np.array(["".join(chars[e - l:e]) for e, l in zip(ends, lens)], dtype=object)


def generate(path: Path, mb: int, seed: int = 0) -> None:
    """Zipf-distributed pseudo-words with punctuation, ~2.5 KB documents, one JSON object per line."""
    rng = np.random.default_rng(seed)
    words = _words(rng)
    punct = np.array([" "] * 7 + [", ", ". ", ".\n"], dtype=object)
    target, n, doc_id = mb * 1_000_000, 0, 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        while n < target:
            k = 200_000
            w = words[np.minimum(rng.zipf(1.2, k), len(words)) - 1]
            s = "".join((w + punct[rng.integers(0, len(punct), k)]).tolist())
            cuts = np.sort(rng.integers(0, len(s), max(1, len(s) // 2500)))
            for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(s)]])):
                d = s[a:b].strip()
                if d:
                    line = json.dumps({"id": doc_id, "text": d}) + "\n"
                    f.write(line)
                    n += len(line)
                    doc_id += 1
    tmp.rename(path)


def texts_of(path: Path) -> list[str]:
    with open(path, "rb") as f:
        return [json.loads(l)["text"] for l in f]


# --------------------------------------------------------------------------- measurements

def _tree_rss(p) -> int:
    import psutil
    try:
        procs = [p] + p.children(recursive=True)
        return sum(q.memory_info().rss for q in procs if q.is_running())
    except psutil.Error:
        return 0


def run_measured(code: str, env: dict) -> tuple[dict, float, int]:
    """Run `python -c code` (which prints one JSON line last); returns (its JSON, CPU seconds of the tree, peak tree RSS)."""
    import psutil
    t_cpu0 = os.times()
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(ps))
        time.sleep(0.1)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"benchmark step failed ({proc.returncode}):\n{out[-3000:]}")
    t_cpu1 = os.times()
    cpu = (t_cpu1.children_user - t_cpu0.children_user) + (t_cpu1.children_system - t_cpu0.children_system)
    return json.loads(out.strip().splitlines()[-1]), cpu, peak


PREP = """
import json, sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from engine.data.pack import Tokenizer, prepare_source
from engine.spec import SourceSpec
tok = Tokenizer({tok!r})
t0 = time.time()
man = prepare_source(SourceSpec(path={src!r}), "bench", tok, Path({out!r}), tok.fingerprint({tok!r}))
print(json.dumps({{"seconds": time.time() - t0, "tokens": man["train"]["tokens"], "documents": man["documents"]}}))
"""

HF = """
import json, time, os
from itertools import chain
import datasets
from transformers import AutoTokenizer
datasets.disable_progress_bars()
tok = AutoTokenizer.from_pretrained({tok!r})
block_size = 2048
t0 = time.time()
raw = datasets.load_dataset("json", data_files={src!r}, split="train", cache_dir={cache!r})
t_load = time.time() - t0
def tokenize_function(examples):
    return tok(examples["text"])
tokenized = raw.map(tokenize_function, batched=True, num_proc={procs}, remove_columns=raw.column_names)
t_tok = time.time() - t0 - t_load
def group_texts(examples):  # run_clm.py (current): itertools.chain
    concatenated_examples = {{k: list(chain(*examples[k])) for k in examples.keys()}}
    total_length = len(concatenated_examples[list(examples.keys())[0]])
    total_length = (total_length // block_size) * block_size
    result = {{k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
               for k, t in concatenated_examples.items()}}
    result["labels"] = result["input_ids"].copy()
    return result
grouped = tokenized.map(group_texts, batched=True, num_proc={procs})
total = time.time() - t0
print(json.dumps({{"seconds": total, "load": t_load, "tokenize": t_tok, "group": total - t_load - t_tok,
                   "tokens": len(grouped) * block_size}}))
"""

RAW = """
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file({tokjson!r})
with open({src!r}, "rb") as f:
    texts = [json.loads(l)["text"] for l in f]
n = 0
t0 = time.time()
for i in range(0, len(texts), 2000):
    n += sum(len(e.ids) for e in tok.{method}(texts[i:i + 2000]))
print(json.dumps({{"seconds": time.time() - t0, "tokens": n}}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="20 MB corpus (and 200 MB for the memory check)")
    ap.add_argument("--mb", type=int, default=None, help="corpus size in MB (default 200; --quick 20)")
    ap.add_argument("--scale", type=int, default=10, help="the larger corpus for the memory check, × mb")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cpt-tui-bench-prep")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-large", action="store_true", help="no memory check on the scaled corpus")
    a = ap.parse_args()
    mb = a.mb or (20 if a.quick else 200)
    cores = len(os.sched_getaffinity(0))
    wd = a.workdir
    wd.mkdir(parents=True, exist_ok=True)
    corpus = wd / f"corpus-{mb}mb.jsonl"
    if not corpus.exists():
        t = time.time()
        generate(corpus, mb)
        print(f"generated {corpus} ({corpus.stat().st_size / 1e6:.0f} MB) in {time.time() - t:.0f}s", flush=True)
    tok_dir = wd / f"tok-{a.vocab}"
    if not (tok_dir / "tokenizer.json").exists():
        from engine.tokenizer import train_bpe
        train_bpe(iter(texts_of(corpus)[:4000]), a.vocab, tok_dir, 10_000_000)
    size = corpus.stat().st_size
    print(f"corpus {size / 1e6:.0f} MB, tokenizer: byte-level BPE, {a.vocab} tokens, {cores} cores", flush=True)

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    res = {}

    def prep(src: str, tag: str) -> tuple[dict, float, int]:
        out = wd / f"prep-{tag}"
        shutil.rmtree(out, ignore_errors=True)
        r = run_measured(PREP.format(root=str(ROOT), tok=str(tok_dir), src=src, out=str(out)),
                         {**env, "TOKENIZERS_PARALLELISM": "false", "CPT_PREP_WORKERS": str(cores)})
        shutil.rmtree(out, ignore_errors=True)
        return r

    raw_code = RAW.format(tokjson=str(tok_dir / "tokenizer.json"), src=str(corpus), method="encode_batch")
    res["raw"] = run_measured(raw_code, {**env, "TOKENIZERS_PARALLELISM": "true"})
    res["prep"] = prep(str(corpus), "a")
    if not a.skip_hf:
        cache = wd / "hf-cache"
        shutil.rmtree(cache, ignore_errors=True)
        res["hf"] = run_measured(HF.format(tok=str(tok_dir), src=str(corpus), cache=str(cache), procs=cores),
                                 {**env, "TOKENIZERS_PARALLELISM": "false"})
        shutil.rmtree(cache, ignore_errors=True)
    res["raw2"] = run_measured(raw_code, {**env, "TOKENIZERS_PARALLELISM": "true"})  # again: the load drifts
    res["raw_fast"] = run_measured(raw_code.replace("tok.encode_batch(", "tok.encode_batch_fast("),
                                   {**env, "TOKENIZERS_PARALLELISM": "true"})

    def tps(k):
        return res[k][0]["tokens"] / res[k][0]["seconds"]

    raw = (tps("raw") + tps("raw2")) / 2
    raw_cpu = (res["raw"][1] + res["raw2"][1]) / 2
    print(f"(a) cpt-tui prep:            {tps('prep'):>12,.0f} tokens/s  ({res['prep'][0]['seconds']:.1f}s wall, "
          f"{res['prep'][1]:.1f} CPU-s, {res['prep'][0]['tokens']:,} tokens, {size / res['prep'][0]['seconds'] / 1e6:.1f} MB/s)")
    if "hf" in res:
        h = res["hf"][0]
        print(f"(b) HF datasets map+group:   {tps('hf'):>12,.0f} tokens/s  ({h['seconds']:.1f}s wall: load {h['load']:.1f}"
              f" + tokenize {h['tokenize']:.1f} + group_texts {h['group']:.1f}; {res['hf'][1]:.1f} CPU-s)")
    print(f"(c) raw encode_batch:        {raw:>12,.0f} tokens/s  (runs: {tps('raw'):,.0f} and {tps('raw2'):,.0f}; "
          f"{raw_cpu:.1f} CPU-s)")
    print(f"    raw encode_batch_fast:   {tps('raw_fast'):>12,.0f} tokens/s  (what prep's workers call for documents its exact fast path does not take)")
    print(f"ratio prep/raw = {tps('prep') / raw:.2f}   (target >= 0.85)")
    if "hf" in res:
        print(f"ratio prep/hf = {tps('prep') / tps('hf'):.2f}   (target >= 2)")
    print(f"ratio prep/raw_fast = {tps('prep') / tps('raw_fast'):.2f}")
    print(f"ratio CPU-seconds raw/prep = {raw_cpu / res['prep'][1]:.2f}"
          + (f", hf/prep = {res['hf'][1] / res['prep'][1]:.2f}" if "hf" in res else ""))
    print(f"peak RSS prep {size / 1e6:.0f} MB: {res['prep'][2] / 2**20:.0f} MiB (process tree)", flush=True)

    if not a.skip_large:
        big = wd / f"big-{mb}x{a.scale}"
        shutil.rmtree(big, ignore_errors=True)
        big.mkdir()
        for i in range(a.scale):
            os.link(corpus, big / f"part-{i:03d}.jsonl")
        r = prep(str(big / "*.jsonl"), "big")
        shutil.rmtree(big, ignore_errors=True)
        print(f"peak RSS prep {a.scale * size / 1e6:.0f} MB: {r[2] / 2**20:.0f} MiB (process tree; "
              f"{r[0]['tokens'] / r[0]['seconds']:,.0f} tokens/s)")
        print(f"ratio peak RSS {a.scale}x/1x = {r[2] / res['prep'][2]:.2f}   (target <= 1.20)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
