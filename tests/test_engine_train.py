"""The engine through its real launch path: a stage.json run by `build_commands(...)[0].launch`
(the raw `accelerate launch` argv) as a subprocess — one process, two gloo processes, DeepSpeed.

A tiny Llama (hidden 32, 2 layers, vocabulary 384) on a few thousand tokens of stdlib prose and
code, prepared once per session. Every events.jsonl seen is checked against the event schema.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cpt_tui.backends import build_commands
from engine.data.pack import open_tokens
from engine.events import read_events, validate_log
from engine.spec import ClusterSpec, MixtureSpec, SourceSpec, StageSpec

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 384
SEQ = 32


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> dict:
    """A BPE tokenizer, a tiny Llama (untied) and two prepared sources: prose and code."""
    from transformers import AutoTokenizer

    from engine.data.builtin import stdlib_code, stdlib_prose
    from engine.data.pack import Tokenizer, prepare_source, tokenizer_fingerprint
    from engine.model import build_from_config
    from engine.spec import ArchConfig
    from engine.tokenizer import train_bpe

    d = tmp_path_factory.mktemp("engine-data")
    tok_dir = d / "tokenizer"
    texts = (t for pair in zip(stdlib_prose(), stdlib_code()) for t in pair)
    train_bpe(texts, VOCAB, tok_dir, max_chars=300_000)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    arch = ArchConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=128)
    build_from_config(arch, len(tok), d / "model", seed=0, tokenizer=tok)
    ptok = Tokenizer(tok_dir)
    fp = tokenizer_fingerprint(tok_dir)
    sources = {}
    for name in ("prose", "code"):
        spec = SourceSpec(path=f"builtin:stdlib-{name}", max_tokens=40_000, val_tokens=4 * SEQ * 8)
        man = prepare_source(spec, name, ptok, d / name, fp)
        sources[name] = {"dir": str(d / name), "domain": name, "train_tokens": man["train"]["tokens"],
                         "val_tokens": man["val"]["tokens"]}
    return {"tokenizer_dir": str(tok_dir), "model_dir": str(d / "model"), "sources": sources, "vocab": len(tok)}


def _require_deepspeed() -> None:
    """deepspeed is a hard dependency (pyproject.toml): missing, it is a broken install — a failure under CI."""
    import importlib.util

    from tests.hosts import require

    require(importlib.util.find_spec("deepspeed") is not None, "deepspeed is not installed")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_stage(prepared: dict, out: Path, *, world: int = 1, steps: int = 12, model_dir: str | None = None,
               resume_from: str | None = None, weights: dict | None = None, **stage) -> tuple[dict, list[str]]:
    """Write out/stage.json for a stage of exactly `steps` steps; returns (config, accelerate argv)."""
    stage.setdefault("seq_len", SEQ)
    stage.setdefault("micro_batch_size", 4)
    stage.setdefault("global_batch_size", 8 * world)
    stage.setdefault("precision", "fp32")
    stage.setdefault("schedule", {"name": "cosine", "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2})
    stage.setdefault("eval", {"every_steps": 6, "max_blocks": 8})
    st = StageSpec.model_validate({"name": "s", "mixture": "m", **stage})
    mix = MixtureSpec(weights=weights or {"prose": 0.5, "code": 0.5},
                      tokens=steps * st.global_batch_size * st.seq_len, seed=7)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"version": 1, "run_dir": str(out), "stage_index": 0, "stage": st.model_dump(mode="json", by_alias=True),
           "mixture": mix.model_dump(mode="json"), "seed": 1234, "model_dir": model_dir or prepared["model_dir"],
           "resume_from": resume_from, "tokenizer_dir": prepared["tokenizer_dir"], "old_vocab_size": None,
           "out_dir": str(out), "sources": prepared["sources"], "world_size": world}
    (out / "stage.json").write_text(json.dumps(cfg, indent=1))
    cmd = build_commands(ClusterSpec(processes_per_node=world), st, str(out / "stage.json"), str(out), cpu=True,
                         main_process_port=_port())[0]
    return cfg, cmd.launch


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    for k in list(env):
        if k.startswith("CPT_FAULT_"):
            del env[k]
    env.update(extra or {})
    return env


def launch(argv: list[str], out: Path, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    with open(out / "train.log", "ab") as log:
        r = subprocess.run(argv, env=_env(env), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    return r


def events(out: Path) -> list[dict]:
    recs, _ = read_events(out / "events.jsonl")
    assert validate_log(recs) == [], validate_log(recs)
    return recs


def log_tail(out: Path, n: int = 40) -> str:
    """The log's last lines, led by the first rank's traceback (the launcher's own, last, hides the cause)."""
    p = out / "train.log"
    if not p.exists():
        return ""
    lines = p.read_text(errors="replace").splitlines()
    first = next((i for i, l in enumerate(lines) if l.startswith("[rank") and "Traceback" in l), None)
    head = lines[first:first + n] + ["..."] if first is not None else []
    return "\n".join(head + lines[-n:])


def losses(out: Path) -> dict[int, float]:
    """Per-step training loss; a step re-done after a crash must repeat its first value exactly."""
    seen: dict[int, float] = {}
    for e in events(out):
        if e["type"] == "metric":
            assert seen.get(e["step"], e["loss"]) == e["loss"], (e["step"], seen[e["step"]], e["loss"])
            seen[e["step"]] = e["loss"]
    return seen


def assert_done(r: subprocess.CompletedProcess, out: Path) -> None:
    assert r.returncode == 0, log_tail(out)
    assert events(out)[-1]["type"] == "status" and events(out)[-1]["state"] == "done"


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# --------------------------------------------------------------------------- bit-exact resume


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    """2N = 12 uninterrupted steps, one process, fp32 (the reference for the resume tests)."""
    out = tmp_path_factory.mktemp("ref")
    cfg, argv = make_stage(prepared, out, checkpoint={"every_steps": 6, "keep_last": 2})
    r = launch(argv, out)
    assert_done(r, out)
    return cfg, out


def test_kill9_resume_is_bit_exact_one_process(prepared, reference, tmp_path):
    _, ref = reference
    out = tmp_path / "b"
    _, argv = make_stage(prepared, out, checkpoint={"every_steps": 6, "keep_last": 2})
    r = launch(argv, out, {"CPT_FAULT_KILL_STEP": "8"})  # SIGKILL in the middle of step 8
    assert r.returncode != 0
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-6"] and not (out / "final").exists()
    r = launch(argv, out)
    assert_done(r, out)
    assert losses(out) == losses(ref) and len(losses(ref)) == 12
    assert_same_weights(out / "final", ref / "final")


def test_kill9_resume_is_bit_exact_two_processes(prepared, tmp_path):
    kw = dict(world=2, checkpoint={"every_steps": 4, "keep_last": 1}, steps=8, eval={"every_steps": 100, "max_blocks": 4})
    ref, out = tmp_path / "ref2", tmp_path / "b2"
    _, argv = make_stage(prepared, ref, **kw)
    assert_done(launch(argv, ref), ref)
    assert any(e.get("world_size") == 2 for e in events(ref))  # really two ranks (gloo)
    _, argv = make_stage(prepared, out, **kw)
    assert launch(argv, out, {"CPT_FAULT_KILL_STEP": "6"}).returncode != 0
    assert_done(launch(argv, out), out)
    assert losses(out) == losses(ref) and len(losses(ref)) == 8
    assert_same_weights(out / "final", ref / "final")


def test_sigterm_checkpoints_and_resume_is_exact(prepared, reference, tmp_path):
    _, ref = reference
    out = tmp_path / "c"
    _, argv = make_stage(prepared, out, checkpoint={"every_steps": 6, "keep_last": 2})
    with open(out / "train.log", "ab") as log:
        p = subprocess.Popen(argv, env=_env({"CPT_FAULT_SLOW_S": "0.3"}), cwd=ROOT, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(e["type"] == "metric" and e["step"] >= 2
                                             for e in read_events(out / "events.jsonl")[0]):
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGTERM)  # the launcher and the trainer, as a terminal or scheduler would
    p.wait(60)
    while time.time() < deadline and not any(e["type"] == "status" and e["state"] == "stopped" for e in events(out)):
        time.sleep(0.2)
    stopped = [e for e in events(out) if e["type"] == "status" and e["state"] == "stopped"]
    assert stopped and stopped[0]["exit_code"] == 75 and 2 <= stopped[0]["step"] < 12
    ck = [e for e in events(out) if e["type"] == "checkpoint"]
    assert ck[-1]["step"] == stopped[0]["step"]
    assert (Path(ck[-1]["path"]) / "trainer_state.json").exists()
    time.sleep(1)  # let the stopped trainer exit
    assert_done(launch(argv, out), out)
    assert losses(out) == losses(ref)
    assert_same_weights(out / "final", ref / "final")


def test_validation_loss_equals_independent_evaluation(prepared, reference):
    from transformers import AutoModelForCausalLM

    cfg, ref = reference
    final_evals = {e["domain"]: e["loss"] for e in events(ref) if e["type"] == "eval" and e["step"] == 12}
    assert set(final_evals) == {"prose", "code"}
    model = AutoModelForCausalLM.from_pretrained(ref / "final").eval()
    for name, src in prepared["sources"].items():
        toks = np.asarray(open_tokens(src["dir"], "val")[: 8 * SEQ]).astype(np.int64)
        blocks = torch.from_numpy(toks.reshape(8, SEQ))
        with torch.no_grad():
            ours = float(np.mean([model(input_ids=b[None], labels=b[None]).loss.item() for b in blocks]))
        assert abs(ours - final_evals[name]) < 1e-3, (name, ours, final_evals[name])


def test_start_resume_from_another_stage_keeps_step_and_data_and_honours_load_flags(prepared, reference, tmp_path):
    """`start: resume` from another stage's checkpoint (nanotron's semantics): the step and the data
    position are kept; with both load flags the curve continues exactly as if never interrupted
    (dropout 0, so no RNG state is needed); without them AdamW starts fresh and the LR warms up again."""
    _, ref = reference
    ref_metrics = {e["step"]: e for e in events(ref) if e["type"] == "metric"}
    ck = str(ref / "checkpoints" / "step-6")
    kw = dict(start="resume", **{"from": ck}, resume_from=ck)
    cont, fresh = tmp_path / "cont", tmp_path / "fresh"
    _, argv = make_stage(prepared, cont, **kw)
    assert_done(launch(argv, cont), cont)
    _, argv = make_stage(prepared, fresh, load_optimizer=False, load_lr_scheduler=False, **kw)
    assert_done(launch(argv, fresh), fresh)
    got = {name: {e["step"]: e for e in events(out) if e["type"] == "metric"} for name, out in
           (("cont", cont), ("fresh", fresh))}
    for name in got:
        assert sorted(got[name]) == list(range(7, 13)), name  # steps 7..12: the step is kept
        assert got[name][7]["tokens"] == ref_metrics[7]["tokens"]  # so is the data position
        assert got[name][7]["loss"] == ref_metrics[7]["loss"]  # same weights, same batch
    assert {s: m["loss"] for s, m in got["cont"].items()} == {s: ref_metrics[s]["loss"] for s in range(7, 13)}
    assert [m["lr"] for m in got["cont"].values()] == [ref_metrics[s]["lr"] for s in range(7, 13)]
    lrs = [got["fresh"][s]["lr"] for s in (7, 8, 9)]
    assert lrs[0] < lrs[1] and lrs[0] < ref_metrics[7]["lr"]  # warming up again from step 7
    assert got["fresh"][8]["loss"] != ref_metrics[8]["loss"]  # a fresh AdamW takes another first step


def test_init_from_a_checkpoint_and_checkpoints_by_tokens_keep_last_and_at_the_end(prepared, reference, tmp_path):
    """`start: init_from` (the plan makes `model_dir` the source: here the reference's step-6
    checkpoint) takes the weights only: step 0, the data from its start, a fresh AdamW, the LR warming up.
    Checkpoints every 1280 tokens (5 steps of 256) and at the end of the stage; keep_last 2 prunes."""
    _, ref = reference
    ref_ev = events(ref)
    out = tmp_path / "init"
    _, argv = make_stage(prepared, out, model_dir=str(ref / "checkpoints" / "step-6"),
                         checkpoint={"every_tokens": 5 * 8 * SEQ, "keep_last": 2})
    assert_done(launch(argv, out), out)
    ev = events(out)
    running = next(e for e in ev if e["type"] == "status" and e["state"] == "running")
    assert running["step"] == 0 and running.get("resumed_from") is None
    # the weights are the step-6 ones: the baseline evaluation at step 0 equals the reference's at step 6
    base = {e["domain"]: e["loss"] for e in ev if e["type"] == "eval" and e["step"] == 0}
    assert base and base == {e["domain"]: e["loss"] for e in ref_ev if e["type"] == "eval" and e["step"] == 6}
    got = {e["step"]: e for e in ev if e["type"] == "metric"}
    want = {e["step"]: e for e in ref_ev if e["type"] == "metric"}
    assert sorted(got) == list(range(1, 13)) and all(got[k]["tokens"] == want[k]["tokens"] for k in got)
    assert [got[k]["lr"] for k in (1, 2, 3)] == [want[k]["lr"] for k in (1, 2, 3)]  # warmup from step 0
    assert got[1]["loss"] < want[1]["loss"] - 0.1  # trained weights on the first batch
    assert [e["step"] for e in ev if e["type"] == "checkpoint"] == [5, 10, 12]  # by tokens, then the end
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-10", "step-12"]  # keep_last 2
    opt = torch.load(out / "checkpoints" / "step-10" / "optimizer.pt", weights_only=False)["state"]
    assert opt and {float(s["step"]) for s in opt.values()} == {10.0}  # a fresh AdamW: 10 steps, not 6 + 10
    assert json.loads((out / "checkpoints" / "step-12" / "trainer_state.json").read_text())["step"] == 12


# --------------------------------------------------------------------------- what trains


def test_new_input_and_output_rows_only(prepared, tmp_path):
    out = tmp_path / "eeve"
    old = 256
    _, argv = make_stage(prepared, out, steps=6, kind="eeve", optimizer={"weight_decay": 0.1},
                         trainable={"input_embeddings": "new", "output_embeddings": "new", "transformer": "frozen",
                                    "old_vocab_size": old})
    assert_done(launch(argv, out), out)
    before, after = weights(Path(prepared["model_dir"])), weights(out / "final")
    for k, w in before.items():
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(w[:old], after[k][:old]), k  # old rows bit-identical, weight decay included
            assert not torch.equal(w[old:], after[k][old:]), k  # new rows learned
        else:
            assert torch.equal(w, after[k]), k  # frozen transformer


def test_lora_base_frozen_and_merged_export_equals_base_plus_adapter(prepared, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    _, argv = make_stage(prepared, out, steps=6, kind="lora", checkpoint={"every_steps": 6},
                         schedule={"name": "constant", "lr": 1e-2},
                         lora={"r": 4, "alpha": 8, "dropout": 0.05, "target_modules": ["q_proj", "v_proj", "up_proj"],
                               "modules_to_save": ["lm_head"]})
    assert_done(launch(argv, out), out)
    base = weights(Path(prepared["model_dir"]))
    ck = weights(out / "checkpoints" / "step-6")
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(ck[f"base_model.model.{q}.base_layer.weight"], base[f"{q}.weight"])  # unchanged until merge
    assert ck[f"base_model.model.{q}.lora_B.default.weight"].abs().sum() > 0  # the adapter learned
    merged = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    assert not torch.equal(merged.state_dict()[f"{q}.weight"], base[f"{q}.weight"])
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(prepared["model_dir"]), out / "final" / "adapter").eval()
    x = torch.randint(0, prepared["vocab"], (2, SEQ))
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, ref(x).logits, rtol=1e-4, atol=1e-5)


def test_relora_merges_reinitialises_and_rewarms(prepared, tmp_path):
    out = tmp_path / "relora"
    _, argv = make_stage(prepared, out, steps=11, kind="relora", log_every=1,
                         schedule={"name": "constant", "lr": 4e-3, "warmup_steps": 1},
                         lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
                               "relora": {"merge_every": 3, "warm_start_steps": 2, "reset": "prune",
                                          "prune_ratio": 0.9, "rewarmup_steps": 2}},
                         checkpoint={"every_steps": 5, "keep_last": 5})
    assert_done(launch(argv, out), out)
    ev = events(out)
    rel = [(e["step"], e["action"]) for e in ev if e["type"] == "relora"]
    assert rel == [(2, "switch"), (5, "merge"), (8, "merge")]
    # The checkpoint of step 5 is written right after its merge: the adapters' Adam moments (lora_A
    # is (r=4, 32), lora_B is (32, r=4); no other parameter has those shapes) were magnitude-pruned to
    # the largest 10% — 115 of each 128 dropped; step 10's, two steps after the last merge, are dense again.
    def adapter_moments(step):
        st = torch.load(out / "checkpoints" / f"step-{step}" / "optimizer.pt", weights_only=False)["state"]
        return [t for s in st.values() for k, t in s.items()
                if k in ("exp_avg", "exp_avg_sq") and tuple(t.shape) in ((4, 32), (32, 4))]
    pruned, dense = adapter_moments(5), adapter_moments(10)
    assert len(pruned) == 2 * 2 * 2 * 2  # 2 layers × (q, v) × (A, B) × 2 moments
    assert all(int((t != 0).sum()) <= 128 - 115 for t in pruned), [int((t != 0).sum()) for t in pruned]
    assert sum(int((t != 0).sum()) for t in pruned) > 0  # pruned, not zeroed
    assert sum(int((t != 0).sum()) for t in dense) > 16 * 128 * 0.5
    assert all(e["delta_norm"] > 0 for e in ev if e["type"] == "relora" and e["action"] == "merge")
    lr = {e["step"]: e["lr"] for e in ev if e["type"] == "metric"}
    # jagged: half the LR on the first step after each restart, full on the next
    for r in (2, 5, 8):
        assert lr[r + 1] == pytest.approx(2e-3) and lr[r + 2] == pytest.approx(4e-3), lr
    base, final = weights(Path(prepared["model_dir"])), weights(out / "final")
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        assert not torch.equal(base[k], final[k])  # warm start (all) and merges (q, v) moved the base


# --------------------------------------------------------------------------- faults and policies


def test_nan_stop_policy(prepared, tmp_path):
    out = tmp_path / "nanstop"
    _, argv = make_stage(prepared, out, steps=6, eval={"every_steps": 100, "max_blocks": 2})
    r = launch(argv, out, {"CPT_FAULT_NAN_STEP": "3"})
    assert r.returncode != 0
    ev = events(out)
    assert any(e["type"] == "warning" and e["kind"] == "nan" and e["step"] == 3 for e in ev)
    assert ev[-1]["type"] == "status" and ev[-1]["state"] == "failed" and "step 3" in ev[-1]["reason"]
    assert not (out / "final").exists()


def test_nan_skip_policy_fp16_on_cpu_and_context_extension(prepared, tmp_path):
    out = tmp_path / "nanskip"
    _, argv = make_stage(prepared, out, steps=6, kind="context_extension", seq_len=64, rope_theta=50000.0,
                         nan_policy="skip", precision="fp16", eval={"every_steps": 100, "max_blocks": 2})
    assert_done(launch(argv, out, {"CPT_FAULT_NAN_STEP": "3"}), out)
    ev = events(out)
    assert any(e["type"] == "warning" and e["kind"] == "precision" for e in ev)  # fp16 → fp32 on CPU
    assert any(e["type"] == "warning" and e["kind"] == "nan" and e["step"] == 3 for e in ev)
    steps = [e["step"] for e in ev if e["type"] == "metric"]
    assert 3 not in steps and steps[-1] == 6
    assert all(torch.isfinite(w).all() for w in weights(out / "final").values())
    conf = json.loads((out / "final" / "config.json").read_text())
    theta = (conf.get("rope_parameters") or {}).get("rope_theta", conf.get("rope_theta"))
    assert theta == 50000.0 and conf["max_position_embeddings"] >= 64
    # The blocks trained were 64 tokens long (data and model were prepared for 32): the token budget
    # cut into 8 blocks a step gave 6 steps (32-token blocks would give 12), and tokens/step is 8 × 64.
    cfg = json.loads((out / "stage.json").read_text())
    running = next(e for e in ev if e["type"] == "status" and e["state"] == "running")
    assert cfg["mixture"]["tokens"] // (running["total_steps"] * 8) == 64 and running["total_steps"] == 6
    assert {e["step"]: e["tokens"] for e in ev if e["type"] == "metric"} == {k: k * 8 * 64 for k in (1, 2, 4, 5, 6)}
    assert all(e["tokens"] == e["step"] * 8 * 64 for e in ev if e["type"] in ("eval", "metric"))


def test_deepspeed_zero2_two_processes_trains_and_resumes(prepared, tmp_path):
    _require_deepspeed()
    out = tmp_path / "ds"
    _, argv = make_stage(prepared, out, world=2, steps=6, zero_stage=2, checkpoint={"every_steps": 3, "keep_last": 1},
                         eval={"every_steps": 100, "max_blocks": 4})
    assert "--use_deepspeed" in argv
    r = launch(argv, out, {"CPT_FAULT_KILL_STEP": "5"}, timeout=400)
    assert r.returncode != 0, log_tail(out)
    first = losses(out)
    assert sorted(first) == [1, 2, 3, 4] and all(np.isfinite(list(first.values())))
    assert (out / "checkpoints" / "step-3" / "engine").is_dir()
    assert_done(launch(argv, out, timeout=400), out)
    again = losses(out)  # step 4 is re-done from the ZeRO checkpoint: the same loss (checked in losses())
    assert sorted(again) == [1, 2, 3, 4, 5, 6]
    assert again[6] < again[1]
    assert any(e.get("world_size") == 2 for e in events(out))


def test_deepspeed_zero3_two_processes_exports_the_gathered_model(prepared, tmp_path):
    """ZeRO-3 partitions every weight over the ranks: the export must gather them. The exported
    model, evaluated by plain transformers, gives the engine's own last validation loss."""
    _require_deepspeed()
    from transformers import AutoModelForCausalLM

    out = tmp_path / "z3"
    _, argv = make_stage(prepared, out, world=2, steps=4, zero_stage=3, eval={"every_steps": 100, "max_blocks": 4})
    assert_done(launch(argv, out, timeout=400), out)
    ev = events(out)
    running = next(e for e in ev if e["type"] == "status" and e["state"] == "running")
    assert running["loss"].startswith("standard") and "ZeRO-3" in running["loss"]  # the chunked loss steps aside
    base, final = weights(Path(prepared["model_dir"])), weights(out / "final")
    assert base.keys() == final.keys()
    assert all(final[k].shape == base[k].shape for k in base)  # whole tensors, not rank partitions
    assert any(not torch.equal(final[k], base[k]) for k in base)
    last = {e["domain"]: e["loss"] for e in ev if e["type"] == "eval" and e["step"] == 4}
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    for name, src in prepared["sources"].items():
        toks = np.asarray(open_tokens(src["dir"], "val")[: 4 * SEQ]).astype(np.int64)
        with torch.no_grad():
            ours = float(np.mean([model(input_ids=b[None], labels=b[None]).loss.item()
                                  for b in torch.from_numpy(toks.reshape(4, SEQ))]))
        assert abs(ours - last[name]) < 1e-3, (name, ours, last[name])
