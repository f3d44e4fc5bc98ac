"""Benchmark of data preparation on real text with a production vocabulary (not a test):
`python bench/prep.py [--mb 130] [--scale 10] [--vocab auto|cl100k|trained] [--skip-datasets] [--skip-large] [--pools]`.

Corpus: real documents nobody here wrote, found on every Debian machine with this project's venv:
/usr/share/common-licenses, /usr/share/doc (gzipped files decompressed), the Python standard
library and the venv's site-packages sources (.py/.md/.rst/.txt); one file = one document (sizes
from a few bytes to megabytes), one JSON object per line, --mb MB (default 130), built once.
Vocabulary: a production byte-level BPE of >= 100k tokens. `cl100k` (the default when it can be
had): OpenAI's cl100k_base ranks (100,256 tokens) as shipped inside the `litellm` wheel on PyPI
(`pip download --no-deps`, once; tiktoken's own encodings are downloaded at run time, so they are
not available offline), converted to a tokenizer.json by transformers' TikTokenConverter (its
Llama 3 style pattern), eos <|endoftext|>. `trained`: a 100,352-token byte-level BPE trained with
`tokenizers` on the corpus (once, cached).
Contenders, side by side in one run on the same cores (each in its own process):
  (a) cpt-tui prep: the whole command (engine.data.pack.Tokenizer + prepare_source: load the tokenizer,
      read + parse JSON, tokenize, pack, write shards). What is cached per tokenizer and library
      versions is computed beforehand and timed separately: the start-up check's verdict, the rank
      derivation, and the tokenizer's backend + BOS/EOS conventions (its first load goes through
      transformers, which imports torch)
  (b) tiktoken encode_ordinary_batch(num_threads=cores) over the parsed texts, with the Encoding
      engine.data.tiktoken_bpe derives from the tokenizer.json (JSON parsing timed apart, orjson):
      tiktoken's own batch API, which returns Python lists of ints
  (b') tiktoken's core at its limit: encode_to_tiktoken_buffer (GIL released, no Python ints) in
      `cores` threads with one CoreBPE each, longest documents first: no JSON, no checks, no packing
  (c) the Rust tokenizer's encode_batch_fast (all cores) over the parsed texts
  (d) Hugging Face datasets: load_dataset("json") + map(tokenize, batched, num_proc) + map(group_texts)
      with the itertools.chain group_texts of the current run_clm.py (PITFALLS #4: the fair baseline)
Exactness: (c)'s ids (+ EOS per document) are hashed and compared with the shards prep wrote.
Then the peak RSS (process tree: prep's process and the helper process of its sampled cross-check;
and the main process alone) of prep on the corpus and on a --scale× larger one (the same file
hard-linked: no extra disk; its documents are numbered on, so the cross-check samples others). Wall-clock figures on a shared machine are noisy: the load average and
CPU seconds are printed too.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LITELLM = "litellm==1.110.2"  # its wheel ships cl100k_base under this file name (sha1 of the URL)
CL100K_IN_WHEEL = "litellm/litellm_core_utils/tokenizers/9b5ad71b2ce5302211f9c61530b329a4922fc6a4"


# --------------------------------------------------------------------------- corpus

def _candidates():
    yield from sorted(Path("/usr/share/common-licenses").glob("*"))
    yield from sorted(Path("/usr/share/doc").rglob("*"))
    paths = sysconfig.get_paths()
    for root in dict.fromkeys([paths["stdlib"], paths["purelib"]]):
        for p in sorted(Path(root).rglob("*")):
            if p.suffix in (".py", ".md", ".rst", ".txt"):
                yield p


def build_corpus(path: Path, mb: int) -> dict:
    """Real files as documents, until `mb` MB of JSONL; returns statistics."""
    target, n, lens = mb * 1_000_000, 0, []
    tmp = path.with_suffix(".tmp")
    seen = set()
    with open(tmp, "w") as out:
        for p in _candidates():
            if n >= target:
                break
            try:
                if not p.is_file() or p.is_symlink():
                    continue
                data = p.read_bytes()
                if p.suffix == ".gz":
                    data = gzip.decompress(data)
                text = data.decode("utf-8")
            except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
                continue
            h = hashlib.sha1(data).digest()
            if "\x00" in text or not text.strip() or h in seen:
                continue
            seen.add(h)
            line = json.dumps({"text": text, "source": str(p)}) + "\n"
            out.write(line)
            n += len(line)
            lens.append(len(text))
    tmp.rename(path)
    lens.sort()
    return {"docs": len(lens), "median_chars": lens[len(lens) // 2], "max_chars": lens[-1]}


# --------------------------------------------------------------------------- vocabulary

def cl100k_tokenizer(wd: Path) -> Path | None:
    out = wd / "tok-cl100k"
    if (out / "tokenizer.json").exists():
        return out
    ranks = wd / "cl100k_base.tiktoken"
    if not ranks.exists():
        dl = wd / "wheel"
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dl), LITELLM],
                           capture_output=True, text=True)
        wheels = list(dl.glob("litellm-*.whl"))
        if r.returncode or not wheels:
            print(f"cannot download {LITELLM}: {r.stderr[-300:]}", flush=True)
            return None
        import zipfile
        with zipfile.ZipFile(wheels[0]) as z:
            ranks.write_bytes(z.read(CL100K_IN_WHEEL))
        shutil.rmtree(dl, ignore_errors=True)
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    tk = TikTokenConverter(vocab_file=str(ranks)).converted()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>").save_pretrained(str(out))
    return out


def trained_tokenizer(wd: Path, corpus: Path) -> Path:
    out = wd / "tok-trained-100k"
    if (out / "tokenizer.json").exists():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()

    def texts():
        with open(corpus, "rb") as f:
            for line in f:
                yield json.loads(line)["text"]
    tok.train_from_iterator(texts(), trainer=trainers.BpeTrainer(
        vocab_size=100_352, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(out))
    return out


# --------------------------------------------------------------------------- measurements

def _tree_rss(p) -> tuple[int, int]:
    """(RSS of the process tree, of its root alone)."""
    import psutil
    try:
        procs = [p] + p.children(recursive=True)
        return sum(q.memory_info().rss for q in procs if q.is_running()), p.memory_info().rss
    except psutil.Error:
        return 0, 0


def run_measured(code: str, env: dict) -> tuple[dict, float, int, int]:
    """Run `python -c code` (which prints one JSON line last); returns (its JSON, CPU seconds of the tree,
    peak tree RSS, peak RSS of the root process)."""
    import psutil
    t_cpu0 = os.times()
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = peak_root = 0
    while proc.poll() is None:
        tree, root = _tree_rss(ps)
        peak, peak_root = max(peak, tree), max(peak_root, root)
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"benchmark step failed ({proc.returncode}):\n{out[-3000:]}")
    t_cpu1 = os.times()
    cpu = (t_cpu1.children_user - t_cpu0.children_user) + (t_cpu1.children_system - t_cpu0.children_system)
    return json.loads(out.strip().splitlines()[-1]), cpu, peak, peak_root


CHECK = """
import json, sys, time
sys.path.insert(0, {root!r})
from engine.data.pack import Tokenizer
from engine.data.tokenize import fast_path_ok
t0 = time.time()
tok = Tokenizer({tok!r})
t_load = time.time() - t0
t0 = time.time()
ok, why, excluded = fast_path_ok(tok.encoder_args())
print(json.dumps({{"seconds": time.time() - t0, "load": t_load, "ok": ok, "why": why, "excluded": len(excluded)}}))
"""

PREP = """
import hashlib, json, sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
import numpy as np
from engine.data.pack import Tokenizer, prepare_source
from engine.spec import SourceSpec
t0 = time.time()
tok = Tokenizer({tok!r})
t_tok = time.time() - t0
man = prepare_source(SourceSpec(path={src!r}, val_tokens=0), "bench", tok, Path({out!r}), tok.fingerprint({tok!r}))
sec = time.time() - t0
h = hashlib.sha256()
if {digest!r}:  # in 16 MB pieces: the digest must not add the whole stream to the peak RSS measured
    for p in sorted(Path({out!r}).glob("train-*.bin")):
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(np.frombuffer(chunk, dtype=tok.dtype).astype(np.uint32).tobytes())
print(json.dumps({{"seconds": sec, "tokenizer_load": t_tok, "tokens": man["train"]["tokens"], "documents": man["documents"],
                  "sha": h.hexdigest()}}))
"""

TIKTOKEN = """
import json, sys, time
sys.path.insert(0, {root!r})
import orjson
from engine.data.tiktoken_bpe import TiktokenBPE, derive
d, why = derive(json.loads(open({tokjson!r}).read()))
enc = TiktokenBPE(d).enc
t0 = time.time()
with open({src!r}, "rb") as f:
    texts = [orjson.loads(l)["text"] for l in f]
t_parse = time.time() - t0
t1 = time.time()
n = 0
for i in range(0, len(texts), 4096):
    n += sum(map(len, enc.encode_ordinary_batch(texts[i:i + 4096], num_threads={cores})))
print(json.dumps({{"seconds": time.time() - t1, "parse": t_parse, "tokens": n + len(texts)}}))
"""

TIKTOKEN_CORE = """
import json, sys, threading, time
sys.path.insert(0, {root!r})
import orjson
from engine.data.tiktoken_bpe import TiktokenBPE, derive
d, why = derive(json.loads(open({tokjson!r}).read()))
base = TiktokenBPE(d)
encs = [base] + [base.copy() for _ in range({cores} - 1)]  # one CoreBPE per thread (no contention)
with open({src!r}, "rb") as f:
    texts = [orjson.loads(l)["text"] for l in f]
order = iter(sorted(range(len(texts)), key=lambda i: -len(texts[i])))  # longest first: no straggler at the end
lock, counts = threading.Lock(), []

def work(fb):
    try:
        encode(fb)
    except BaseException as e:  # a thread's error must fail the run, not shorten it
        counts.append(e)

def encode(fb):
    core, none, n = fb._core, fb._none, 0
    while True:
        with lock:
            i = next(order, None)
        if i is None:
            counts.append(n)
            return
        n += memoryview(core.encode_to_tiktoken_buffer(texts[i], none)).nbytes // 4
t1 = time.time()
threads = [threading.Thread(target=work, args=(e,)) for e in encs]
for t in threads:
    t.start()
for t in threads:
    t.join()
for c in counts:
    if isinstance(c, BaseException):
        raise c
print(json.dumps({{"seconds": time.time() - t1, "tokens": sum(counts) + len(texts)}}))
"""

HF_ENCODE = """
import hashlib, json, sys, time
import numpy as np
import orjson
from tokenizers import Tokenizer
tok = Tokenizer.from_file({tokjson!r})
eos = tok.token_to_id("<|endoftext|>")
with open({src!r}, "rb") as f:
    texts = [orjson.loads(l)["text"] for l in f]
n, h, t = 0, hashlib.sha256(), 0.0
for i in range(0, len(texts), 2000):
    t0 = time.time()
    encs = tok.encode_batch_fast(texts[i:i + 2000], add_special_tokens=False)
    t += time.time() - t0
    ids = [e.ids + [eos] for e in encs]
    n += sum(map(len, ids))
    h.update(np.fromiter((x for d in ids for x in d), dtype=np.uint32).tobytes())
print(json.dumps({{"seconds": t, "tokens": n, "sha": h.hexdigest()}}))
"""

DATASETS = """
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=130, help="corpus size in MB (default 130)")
    ap.add_argument("--scale", type=int, default=10, help="the larger corpus for the memory check, × mb")
    ap.add_argument("--vocab", choices=["auto", "cl100k", "trained"], default="auto")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cpt-tui-bench-prep")
    ap.add_argument("--skip-datasets", action="store_true")
    ap.add_argument("--skip-large", action="store_true", help="no memory check on the scaled corpus")
    ap.add_argument("--pools", action="store_true", help="also time prep with worker processes instead of threads")
    a = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    wd = a.workdir
    wd.mkdir(parents=True, exist_ok=True)
    corpus = wd / f"real-{a.mb}mb.jsonl"
    stats_file = corpus.with_suffix(".stats.json")
    if not corpus.exists():
        t = time.time()
        stats_file.write_text(json.dumps(build_corpus(corpus, a.mb)))
        print(f"built {corpus} in {time.time() - t:.0f}s", flush=True)
    stats = json.loads(stats_file.read_text())
    tok_dir = None
    if a.vocab in ("auto", "cl100k"):
        tok_dir = cl100k_tokenizer(wd)
        if tok_dir is None and a.vocab == "cl100k":
            return 1
    if tok_dir is None:
        tok_dir = trained_tokenizer(wd, corpus)
    tokjson = str(tok_dir / "tokenizer.json")
    from tokenizers import Tokenizer
    vocab = Tokenizer.from_file(tokjson).get_vocab_size()
    size = corpus.stat().st_size
    print(f"corpus {size / 1e6:.0f} MB of real text ({stats['docs']:,} documents, median {stats['median_chars']:,} "
          f"chars, largest {stats['max_chars']:,}); tokenizer {tok_dir.name}: byte-level BPE, {vocab:,} tokens; "
          f"{cores} cores; load average {os.getloadavg()[0]:.2f}", flush=True)

    # a private cache for the start-up check's verdict: computed (and timed) once here, then reused
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(wd / "xdg")}
    shutil.rmtree(wd / "xdg", ignore_errors=True)
    chk = run_measured(CHECK.format(root=str(ROOT), tok=str(tok_dir)), env)[0]
    print(f"first load of the tokenizer (through transformers, which imports torch; then cached per tokenizer files and "
          f"library versions): {chk['load']:.1f}s", flush=True)
    print(f"start-up check (derivation + probe, once per tokenizer and library versions): {chk['seconds']:.1f}s, "
          f"fast path {('on, ' + str(chk['excluded']) + ' characters excluded') if chk['ok'] else 'OFF: ' + chk['why']}", flush=True)
    res = {}

    def prep(src: str, tag: str, digest: bool = False, pool: str = "thread") -> tuple[dict, float, int]:
        out = wd / f"prep-{tag}"
        shutil.rmtree(out, ignore_errors=True)
        r = run_measured(PREP.format(root=str(ROOT), tok=str(tok_dir), src=src, out=str(out), digest=digest),
                         {**env, "TOKENIZERS_PARALLELISM": "false", "CPT_PREP_WORKERS": str(cores),
                          "CPT_PREP_POOL": pool})
        shutil.rmtree(out, ignore_errors=True)
        return r

    tt_code = TIKTOKEN.format(root=str(ROOT), tokjson=tokjson, src=str(corpus), cores=cores)
    hf_code = HF_ENCODE.format(tokjson=tokjson, src=str(corpus))
    par = {**env, "TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": str(cores)}
    # interleaved (prep, tiktoken, prep, tiktoken): the load of a shared machine drifts
    res["prep"] = prep(str(corpus), "a", digest=True)
    res["tt"] = run_measured(tt_code, env)
    res["prep2"] = prep(str(corpus), "b")
    res["tt2"] = run_measured(tt_code, env)
    res["core"] = run_measured(TIKTOKEN_CORE.format(root=str(ROOT), tokjson=tokjson, src=str(corpus), cores=cores), env)
    res["hf"] = run_measured(hf_code, par)
    if a.pools:
        res["prep_proc"] = prep(str(corpus), "p", pool="process")
    if not a.skip_datasets:
        cache = wd / "hf-cache"
        shutil.rmtree(cache, ignore_errors=True)
        res["ds"] = run_measured(DATASETS.format(tok=str(tok_dir), src=str(corpus), cache=str(cache), procs=cores),
                                 {**env, "TOKENIZERS_PARALLELISM": "false"})
        shutil.rmtree(cache, ignore_errors=True)

    def sec(k):
        return res[k][0]["seconds"]

    from engine.data.tokenize import VERIFY_EVERY, VERIFY_MAX_CHARS
    import orjson
    with open(corpus, "rb") as f:
        lens = [len(orjson.loads(line)["text"]) for line in f]
    sampled = lens[::VERIFY_EVERY]
    kept = [n for n in sampled if n <= VERIFY_MAX_CHARS]
    checked = (len(kept), sum(kept), sum(lens), len(sampled) - len(kept))

    tokens = res["prep"][0]["tokens"]
    prep_s = min(sec("prep"), sec("prep2"))
    tt_s = min(sec("tt"), sec("tt2"))
    tt_parse = min(res["tt"][0]["parse"], res["tt2"][0]["parse"])
    exact = res["prep"][0]["sha"] == res["hf"][0]["sha"] and tokens == res["hf"][0]["tokens"]
    print(f"(a) cpt-tui prep (whole command): {tokens / prep_s:>11,.0f} tokens/s  (runs {sec('prep'):.1f}s and "
          f"{sec('prep2'):.1f}s wall, {res['prep'][1]:.1f} and {res['prep2'][1]:.1f} CPU-s; of which loading the "
          f"tokenizer {res['prep'][0]['tokenizer_load']:.1f}s and {res['prep2'][0]['tokenizer_load']:.1f}s; "
          f"{tokens:,} tokens incl. EOS, {res['prep'][0]['documents']:,} documents, {size / prep_s / 1e6:.1f} MB/s)")
    print(f"(b) tiktoken encode_ordinary_batch({cores} threads): {tokens / tt_s:>11,.0f} tokens/s  (runs {sec('tt'):.1f}s "
          f"and {sec('tt2'):.1f}s, {res['tt'][1]:.1f} and {res['tt2'][1]:.1f} CPU-s incl. its parsing; after orjson "
          f"parsing {tt_parse:.1f}s; {res['tt'][0]['tokens']:,} tokens incl. EOS)")
    print(f"(b') tiktoken's core alone ({cores} threads, one CoreBPE each, buffers not lists, longest documents first): "
          f"{tokens / sec('core'):>11,.0f} tokens/s  ({sec('core'):.1f}s after parsing, {res['core'][1]:.1f} CPU-s incl. "
          f"parsing; {res['core'][0]['tokens']:,} tokens incl. EOS)")
    print(f"(c) HF encode_batch_fast ({cores} threads): {tokens / sec('hf'):>11,.0f} tokens/s  ({sec('hf'):.1f}s, after parsing)")
    if "prep_proc" in res:
        print(f"    prep with {cores} worker processes instead of threads: {tokens / sec('prep_proc'):,.0f} tokens/s "
              f"({sec('prep_proc'):.1f}s, {res['prep_proc'][1]:.1f} CPU-s)")
    if "ds" in res:
        h = res["ds"][0]
        print(f"(d) datasets map + group_texts: {tokens / h['seconds']:>11,.0f} tokens/s  ({h['seconds']:.1f}s wall: load "
              f"{h['load']:.1f} + tokenize {h['tokenize']:.1f} + group_texts {h['group']:.1f}; {res['ds'][1]:.1f} CPU-s)")
    print(f"exact ids: prep's shards {'==' if exact else '!='} the Rust tokenizer's ids + EOS for every document "
          f"(sha256 {res['prep'][0]['sha'][:12]} vs {res['hf'][0]['sha'][:12]})")
    print(f"sampled cross-check during prep (engine/data/tokenize.py: documents 0, {VERIFY_EVERY}, {2 * VERIFY_EVERY}, ... "
          f"re-encoded by the Rust tokenizer): {checked[0]:,} documents, {checked[1] / max(checked[2], 1):.1%} of the characters; "
          f"{checked[3]} sampled documents over {VERIFY_MAX_CHARS:,} characters not re-encoded (bounded memory)")
    print(f"ratio prep/tiktoken = {tt_s / prep_s:.2f}   (target >= 0.8; tiktoken encode only, its JSON parsing not counted)")
    print(f"ratio prep/tiktoken_with_parse = {(tt_s + tt_parse) / prep_s:.2f}")
    print(f"ratio prep/tiktoken_core = {sec('core') / prep_s:.2f}   (the encoder's limit on these cores: no JSON, no "
          "checks, no packing or writing, an ideal schedule)")
    print(f"ratio prep/hf_encode = {sec('hf') / prep_s:.2f}")
    if "ds" in res:
        print(f"ratio prep/datasets = {res['ds'][0]['seconds'] / prep_s:.2f}")
    print(f"peak RSS prep {size / 1e6:.0f} MB: {res['prep'][2] / 2**20:.0f} MiB (process tree; main process "
          f"{res['prep'][3] / 2**20:.0f} MiB, the rest the cross-check process)", flush=True)

    if not a.skip_large:
        big = wd / f"big-{a.mb}x{a.scale}"
        shutil.rmtree(big, ignore_errors=True)
        big.mkdir()
        for i in range(a.scale):
            os.link(corpus, big / f"part-{i:03d}.jsonl")
        r = prep(str(big / "*.jsonl"), "big")
        shutil.rmtree(big, ignore_errors=True)
        print(f"peak RSS prep {a.scale * size / 1e6:.0f} MB: {r[2] / 2**20:.0f} MiB (process tree; main process "
              f"{r[3] / 2**20:.0f} MiB; {r[0]['tokens'] / r[0]['seconds']:,.0f} tokens/s)")
        print(f"ratio peak RSS {a.scale}x/1x = {r[2] / res['prep'][2]:.2f}   (target <= 1.20; main process alone "
              f"{r[3] / res['prep'][3]:.2f})")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
