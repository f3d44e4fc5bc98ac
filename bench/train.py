"""Training-speed benchmark (not a test): `python bench/train.py [--steps 60] [--warmup 10]`.

The same tiny Llama, batch and data for
  (a) the engine as cpt-tui launches it (stage.json → `accelerate launch -m engine.train`, one
      process); tokens/s and data-loader wait are read from its metric events;
  (a') the same with `fused_loss: false` (transformers' own loss, as (b) and (c) use): the loop's
      overhead alone, without the chunked loss of engine/loss.py;
  (b) a minimal hand-written PyTorch loop (forward, backward, AdamW) — the limit;
  (c) the HF Trainer, run_clm-style (pre-grouped blocks, default collator).
All three: fp32, no gradient clipping, constant LR, the same torch thread count, timed over the
same steps after `--warmup` steps. Each contender runs in a fresh process of its own (b and c via
`--child`), so none profits from another's warmed-up heap. Each figure is reported two ways: over the whole timed span
(best of the rounds) and from the median step time over all rounds (robust to a noisy neighbour). Then the time to the first step of a stage resumed at step
10 000 vs at step 10, from synthetic checkpoints (a real checkpoint with its step rewritten).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEQ, MICRO, LR, WD = 256, 8, 1e-3, 0.1


def prepare(d: Path, vocab: int | None = None, hidden: int = 128, inter: int = 256) -> dict:
    from transformers import AutoTokenizer

    from engine.data.builtin import stdlib_prose
    from engine.data.pack import Tokenizer, prepare_source, tokenizer_fingerprint
    from engine.model import build_from_config
    from engine.spec import ArchConfig, SourceSpec
    from engine.tokenizer import train_bpe

    train_bpe(stdlib_prose(), 2048, d / "tok", max_chars=1_000_000)
    tok = AutoTokenizer.from_pretrained(d / "tok")
    arch = ArchConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=max(512, SEQ), vocab_size=vocab)
    build_from_config(arch, len(tok), d / "model", seed=0, tokenizer=tok)
    man = prepare_source(SourceSpec(path="builtin:stdlib-prose", max_tokens=400_000), "prose",
                         Tokenizer(d / "tok"), d / "prose", tokenizer_fingerprint(d / "tok"))
    return {"tokenizer_dir": str(d / "tok"), "model_dir": str(d / "model"),
            "sources": {"prose": {"dir": str(d / "prose"), "domain": "prose", "train_tokens": man["train"]["tokens"],
                                  "val_tokens": 0}}}


def stage_cfg(prep: dict, out: Path, steps: int, **extra) -> tuple[dict, list[str]]:
    from cpt_tui.backends import build_commands
    from engine.spec import ClusterSpec, MixtureSpec, StageSpec

    st = StageSpec.model_validate({
        "name": "bench", "mixture": "m", "seq_len": SEQ, "micro_batch_size": MICRO, "global_batch_size": MICRO,
        "precision": "fp32", "schedule": {"name": "constant", "lr": LR}, "optimizer": {"weight_decay": WD,
                                                                                        "grad_clip": None},
        "log_every": 1, **extra})
    mix = MixtureSpec(weights={"prose": 1.0}, tokens=steps * MICRO * SEQ, seed=1)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"version": 1, "run_dir": str(out), "stage_index": 0, "stage": st.model_dump(mode="json", by_alias=True),
           "mixture": mix.model_dump(mode="json"), "seed": 1, "model_dir": prep["model_dir"], "resume_from": None,
           "tokenizer_dir": prep["tokenizer_dir"], "old_vocab_size": None, "out_dir": str(out),
           "sources": prep["sources"], "world_size": 1}
    (out / "stage.json").write_text(json.dumps(cfg))
    return cfg, build_commands(ClusterSpec(), st, str(out / "stage.json"), str(out), cpu=True)[0].launch


THREADS = {}  # OMP_NUM_THREADS for the engine process, when --threads is given


PEAK_RSS: list[int] = []  # memory mode: the peak RSS of the last launched contender's processes


def _rss_wrapped(argv: list[str]) -> tuple[list[str], Path | None]:
    """Memory mode: run `argv` under `--maxrss` (a fresh process whose children are only this contender)."""
    if not MEMORY:
        return argv, None
    out = Path(tempfile.mktemp(prefix="cpt-bench-rss-", suffix=".json"))
    return [sys.executable, __file__, "--maxrss", str(out), "--", *argv], out


def _read_rss(out: Path | None) -> None:
    if out is not None:
        PEAK_RSS.append(json.loads(out.read_text())["maxrss"])
        out.unlink()


def launch(argv: list[str], out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **THREADS}
    argv, rss = _rss_wrapped(argv)
    with open(out / "train.log", "ab") as log:
        subprocess.run(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    _read_rss(rss)


def events(out: Path) -> list[dict]:
    from engine.events import read_events

    return read_events(out / "events.jsonl")[0]


def run_engine(prep: dict, d: Path, steps: int, warm: int, **extra) -> tuple[tuple[float, float], float, int, list]:
    """((tokens per wall second, tokens per CPU second), data-wait share, threads, step times) from the events."""
    out = d / f"engine-{time.monotonic_ns()}"
    _, argv = stage_cfg(prep, out, steps, **extra)
    launch(argv, out)
    ev = events(out)
    threads = next(e["threads"] for e in ev if e["type"] == "status" and e["state"] == "starting")
    m = {e["step"]: e for e in ev if e["type"] == "metric"}
    span = m[steps]["elapsed"] - m[warm]["elapsed"]
    wait = sum(m[s]["data_wait_s"] for s in range(warm + 1, steps + 1))
    cpu = sum(m[s]["cpu_s"] for s in range(warm + 1, steps + 1))
    toks = m[steps]["tokens"] - m[warm]["tokens"]
    return (toks / span, toks / cpu), wait / span, threads, [m[s]["step_time_s"] for s in range(warm + 1, steps + 1)]


def batches(cfg: dict, steps: int):
    """The engine's own batches, in its order, materialised up front (no data cost for b and c)."""
    from engine.spec import MixtureSpec, StageSpec
    from engine.train import StageData

    data = StageData(cfg, StageSpec.model_validate(cfg["stage"]), MixtureSpec.model_validate(cfg["mixture"]), 1)
    return [data.batch(range(i * MICRO, (i + 1) * MICRO)) for i in range(steps)]


def run_handwritten(prep: dict, xs, warm: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(prep["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, betas=(0.9, 0.95))
    steps = []
    for i, x in enumerate(xs):
        if i == warm:
            t0, c0 = time.perf_counter(), time.process_time()
        s0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warm:
            steps.append(time.perf_counter() - s0)
    toks = (len(xs) - warm) * MICRO * SEQ
    return (toks / (time.perf_counter() - t0), toks / (time.process_time() - c0)), steps


def run_hf_trainer(prep: dict, xs, warm: int, d: Path) -> float:
    import torch
    from transformers import (AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments,
                              default_data_collator)

    rows = [{"input_ids": r, "labels": r.clone()} for x in xs for r in x]
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append((time.perf_counter(), time.process_time()))

    model = AutoModelForCausalLM.from_pretrained(prep["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    args = TrainingArguments(output_dir=str(d / "hf"), per_device_train_batch_size=MICRO, max_steps=len(xs),
                             learning_rate=LR, weight_decay=WD, adam_beta2=0.95, lr_scheduler_type="constant",
                             max_grad_norm=0.0, logging_steps=10**9, save_strategy="no", report_to=[],
                             dataloader_num_workers=0, use_cpu=True, seed=1, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator,
            callbacks=[Clock()]).train()
    toks = (len(xs) - warm) * MICRO * SEQ
    steps = [b[0] - a[0] for a, b in zip(stamps[warm - 1:], stamps[warm:])]
    return (toks / (stamps[-1][0] - stamps[warm - 1][0]), toks / (stamps[-1][1] - stamps[warm - 1][1])), steps


def time_to_first_step(prep: dict, d: Path) -> dict[int, tuple[float, float]]:
    """Resume a stage at step 10 and at step 10 000 (checkpoints built from a real one)."""
    total = 10_002
    seed_dir = d / "seed"
    _, argv = stage_cfg(prep, seed_dir, total, max_steps=2, checkpoint={"every_steps": 2})
    launch(argv, seed_dir)
    src = seed_dir / "checkpoints" / "step-2"
    out: dict[int, tuple[float, float]] = {}
    for rep, step in enumerate((10, 10_000, 10, 10_000)):  # alternated, the best of two each
        run = d / f"resume-{step}-{rep}"
        _, argv = stage_cfg(prep, run, total, max_steps=step + 1, checkpoint={"every_steps": 10**6})
        ck = run / "checkpoints" / f"step-{step}"
        shutil.copytree(src, ck)
        state = json.loads((ck / "trainer_state.json").read_text())
        state.update(step=step, position=step * MICRO)
        (ck / "trainer_state.json").write_text(json.dumps(state))
        t0 = time.time()
        launch(argv, run)
        ev = events(run)
        first = next(e for e in ev if e["type"] == "metric")
        start = next(e for e in ev if e["type"] == "status" and e["state"] == "starting")
        assert first["step"] == step + 1
        got = (first["ts"] - start["ts"], first["ts"] - t0)
        out[step] = min(out.get(step, got), got)
    return out


def run_child(kind: str, prep: dict, cfg: dict, steps: int, warm: int, d: Path, threads: int):
    """(b) or (c) in a fresh process, like the engine: ((tokens/s, tokens/cpu-s), step times)."""
    job = d / f"child-{kind}-{time.monotonic_ns()}.json"
    job.write_text(json.dumps({"kind": kind, "prep": prep, "cfg": cfg, "steps": steps, "warm": warm,
                               "dir": str(d), "threads": threads, "shape": (SEQ, MICRO)}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **THREADS}
    argv, rss = _rss_wrapped([sys.executable, __file__, "--child", str(job)])
    subprocess.run(argv, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _read_rss(rss)
    r = json.loads(job.with_suffix(".out").read_text())
    return tuple(r["tput"]), r["steps"]


def child(path: str) -> None:
    import torch

    job = json.loads(Path(path).read_text())
    global SEQ, MICRO
    SEQ, MICRO = job.get("shape", (SEQ, MICRO))
    torch.set_num_threads(job["threads"])  # the same intra-op threads as the engine process had
    xs = batches(job["cfg"], job["steps"])
    if job["kind"] == "hand":
        tput, st = run_handwritten(job["prep"], xs, job["warm"])
    else:
        tput, st = run_hf_trainer(job["prep"], xs, job["warm"], Path(job["dir"]))
    Path(path).with_suffix(".out").write_text(json.dumps({"tput": tput, "steps": st}))


MEMORY = False
MEM_VOCAB, MEM_HIDDEN, MEM_INTER, MEM_SEQ = 128_256, 128, 256, 2048


def maxrss(out: str, argv: list[str]) -> None:
    """Run argv; write the largest peak RSS among its (waited-for) processes."""
    import resource

    rc = subprocess.run(argv).returncode
    Path(out).write_text(json.dumps({"maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
    sys.exit(rc)


def memory_mode(a) -> None:
    """Issue 18 item 3: peak RSS and tokens/s of the three contenders at a production vocabulary."""
    import statistics

    from engine import memory as M
    from engine.spec import StageSpec

    global SEQ, MICRO, MEMORY
    SEQ, MICRO, MEMORY = MEM_SEQ, a.micro, True
    names = {"engine": "engine (accelerate launch)", "hand": "handwritten loop", "hf": "HF Trainer (run_clm)"}
    with tempfile.TemporaryDirectory(prefix="cpt-bench-mem-") as tmp:
        d = Path(tmp)
        prep = prepare(d, vocab=MEM_VOCAB, hidden=MEM_HIDDEN, inter=MEM_INTER)
        cfg, _ = stage_cfg(prep, d / "order", a.steps)
        peak, tput = {}, {}
        eng, _, threads, st = run_engine(prep, d, a.steps, a.warmup)
        peak["engine"], tput["engine"] = PEAK_RSS[-1], MICRO * SEQ / statistics.median(st)
        print(f"engine: peak RSS {peak['engine'] / 2**20:,.0f} MiB, {tput['engine']:,.0f} tok/s", flush=True)
        for k in ("hf", "hand"):
            _, st = run_child(k, prep, cfg, a.steps, a.warmup, d, threads)
            peak[k], tput[k] = PEAK_RSS[-1], MICRO * SEQ / statistics.median(st)
            print(f"{k}: peak RSS {peak[k] / 2**20:,.0f} MiB, {tput[k]:,.0f} tok/s  (load {os.getloadavg()[0]:.1f})",
                  flush=True)
        load = os.getloadavg()
    arch = M.arch_from_hf({"vocab_size": MEM_VOCAB, "hidden_size": MEM_HIDDEN, "intermediate_size": MEM_INTER,
                           "num_hidden_layers": 2, "num_attention_heads": 4})
    stage = StageSpec.model_validate(cfg["stage"])
    est = M.stage_memory(arch, stage, 1)
    print(f"model: Llama vocab {MEM_VOCAB:,}, hidden {MEM_HIDDEN}, 2 layers ({M.count_params(arch):,} params); "
          f"batch {MICRO}x{SEQ}; fp32; {threads} thread(s); steps {a.warmup + 1}..{a.steps} timed (median step)")
    for k, n in names.items():
        print(f"{n:28s} peak RSS {peak[k] / 2**20:>8,.0f} MiB  {tput[k]:>8,.0f} tok/s")
    print(f"engine/memory.py estimate (states + step peak, no reserve): "
          f"{(est['per_process_gpu_bytes'] - est['bytes']['overhead']) / 2**20:,.0f} MiB")
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores")
    print(f"ratio peak_mem engine/hf_trainer = {peak['engine'] / peak['hf']:.3f}   (target <= 0.5)")
    print(f"ratio peak_mem engine/handwritten = {peak['engine'] / peak['hand']:.3f}")
    print(f"ratio engine/hf_trainer (median step, 128k vocab) = {tput['engine'] / tput['hf']:.3f}")
    print(f"ratio engine/handwritten (median step, 128k vocab) = {tput['engine'] / tput['hand']:.3f}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        return child(sys.argv[2])
    if len(sys.argv) > 4 and sys.argv[1] == "--maxrss" and sys.argv[3] == "--":
        return maxrss(sys.argv[2], sys.argv[4:])
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for all (default: torch's)")
    ap.add_argument("--memory", action="store_true", help="peak RSS at a 128k vocabulary, seq 2048 (issue 18 item 3)")
    ap.add_argument("--micro", type=int, default=1, help="--memory: micro batch (1-2)")
    a = ap.parse_args()
    if a.memory:
        if a.threads:
            THREADS["OMP_NUM_THREADS"] = str(a.threads)
        return memory_mode(a)
    import statistics

    if a.threads:
        THREADS["OMP_NUM_THREADS"] = str(a.threads)
    names = {"engine": "engine (accelerate launch)", "engine_std": "engine, fused_loss off",
             "hand": "handwritten loop", "hf": "HF Trainer (run_clm)"}
    with tempfile.TemporaryDirectory(prefix="cpt-bench-") as tmp:
        d = Path(tmp)
        prep = prepare(d)
        cfg, _ = stage_cfg(prep, d / "order", a.steps)
        res = {k: [] for k in names}  # per round: (tokens/s, tokens/cpu-s)
        step_times = {k: [] for k in names}
        waits = []
        for r in range(a.rounds):  # interleaved: a noisy neighbour slows all of them alike
            eng, wait_share, threads, st = run_engine(prep, d, a.steps, a.warmup)
            res["engine"].append(eng)
            step_times["engine"] += st
            waits.append(wait_share)
            eng, _, _, st = run_engine(prep, d, a.steps, a.warmup, fused_loss=False)
            res["engine_std"].append(eng)
            step_times["engine_std"] += st
            for k in ("hand", "hf"):
                tput, st = run_child(k, prep, cfg, a.steps, a.warmup, d, threads)
                res[k].append(tput)
                step_times[k] += st
            print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1][0]:,.0f} tok/s" for k, v in res.items()), flush=True)
        ttfs = time_to_first_step(prep, d)
    print(f"model: Llama hidden 128, 2 layers, vocab 2048; batch {MICRO}x{SEQ} tokens; fp32; {threads} thread(s); "
          f"steps {a.warmup + 1}..{a.steps} timed; {a.rounds} interleaved rounds")
    per_step = MICRO * SEQ
    med = {k: per_step / statistics.median(v) for k, v in step_times.items()}
    best = {k: max(x[0] for x in v) for k, v in res.items()}
    cpu = {k: max(x[1] for x in v) for k, v in res.items()}
    for k, n in names.items():
        print(f"{n:28s} {med[k]:>9,.0f} tok/s (median step)  {best[k]:>9,.0f} tok/s (best span)  "
              f"{cpu[k]:>9,.0f} tok/cpu-s")
    for label, v in (("median step", med), ("best span", best), ("cpu", cpu)):
        print(f"ratio engine/handwritten ({label}) = {v['engine'] / v['hand']:.3f}   (target >= 0.95)")
        print(f"ratio engine/hf_trainer ({label}) = {v['engine'] / v['hf']:.3f}   (target >= 1.1)")
        print(f"ratio engine_fused_loss_off/handwritten ({label}) = {v['engine_std'] / v['hand']:.3f}   "
              "(the loop's own overhead)")
    print(f"data-loader wait share = {min(waits):.4%} of step time   (target < 1%; worst round {max(waits):.4%})")
    for step, (in_proc, wall) in ttfs.items():
        print(f"time to first step resuming at step {step:>6} = {in_proc:.2f} s after trainer start "
              f"({wall:.2f} s from launch)")
    print(f"ratio ttfs 10000/10 = {ttfs[10_000][0] / ttfs[10][0]:.3f}")


if __name__ == "__main__":
    main()
