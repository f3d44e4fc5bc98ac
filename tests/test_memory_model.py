"""engine/memory.py against reality: tensors' bytes on CPU, DeepSpeed's estimators and partitions, and the
peak-RSS increase of a forward + backward (each shape in a fresh process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import memory as M
from engine.spec import LoraSpec, StageSpec, TrainableSpec
from tests.hosts import free_port

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(vocab_size=1000, hidden_size=64, intermediate_size=136, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, model_type="llama")


def _model(tied=False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = {k: v for k, v in CFG.items() if k != "model_type"}
    return LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=tied))


def _step(model, params_groups):
    """One fused-AdamW step as the trainer takes it; returns (param, grad, optimizer) bytes."""
    import torch

    opt = torch.optim.AdamW(params_groups, lr=1e-3)
    x = torch.randint(0, CFG["vocab_size"], (1, 16))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    seen, pb, gb = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        pb += p.numel() * p.element_size()
        gb += p.grad.numel() * p.grad.element_size() if p.grad is not None else 0
    ob = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values())
    return pb, gb, ob


def _states(stage_kw: dict, tied=False):
    a = M.arch_from_hf({**CFG, "tie_word_embeddings": tied})
    st = StageSpec.model_validate({"name": "s", "mixture": "m", "seq_len": 16, "global_batch_size": 1, **stage_kw})
    t = M.stage_tensors(a, st.trainable, st.lora)
    ms = M.model_states(t, 0, "fp32", 1)
    return t, ms


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_names_and_counts(tied):
    model = _model(tied)
    a = M.arch_from_hf({**CFG, "tie_word_embeddings": tied})
    assert M.param_shapes(a) == {n: tuple(p.shape) for n, p in model.named_parameters()}
    mod = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert M.largest_layer_params(a) == mod


def test_plain_stage_bytes():
    from engine.trainable import apply_trainable, param_groups

    model = _model()
    spec = TrainableSpec()
    guard = apply_trainable(model, spec, None)
    _, ms = _states({})
    assert _step(model, param_groups(model, 0.1, guard)) == (ms["params"], ms["grads"], ms["optimizer"])


@pytest.mark.parametrize("tied", [False, True])
def test_eeve_frozen_stage_bytes(tied):
    """EEVE: transformer frozen, new rows of both embeddings (guarded: full gradient and moments)."""
    from engine.trainable import apply_trainable, param_groups

    model = _model(tied)
    kw = {"trainable": {"transformer": "frozen", "input_embeddings": "new", "output_embeddings": "new",
                        "old_vocab_size": 900, "include": [r"layers\.1\.mlp\.down"]}}
    spec = StageSpec.model_validate({"name": "s", "mixture": "m", "seq_len": 16, "global_batch_size": 1, **kw})
    guard = apply_trainable(model, spec.trainable, 900)
    t, ms = _states(kw, tied)
    assert t.n_trainable == sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    assert t.guarded == ({"model.embed_tokens.weight"} if tied else {"model.embed_tokens.weight", "lm_head.weight"})
    assert _step(model, param_groups(model, 0.1, guard)) == (ms["params"], ms["grads"], ms["optimizer"])


LORAS = [{"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "modules_to_save": ["lm_head"]},
         {"r": 2, "target_modules": ["embed_tokens", "lm_head", "o_proj"]}]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("lora", range(len(LORAS)))
def test_lora_stage_bytes(tied, lora):
    """LoRA with the head in modules_to_save (peft trains a copy of it: of the embedding, when tied), and
    with the embedding (peft's lora_embedding_A/B) and the head as targets."""
    from engine.lora import apply_lora
    from engine.trainable import RowGuard, apply_patterns, param_groups

    lora = LORAS[lora]
    model = apply_lora(_model(tied), LoraSpec.model_validate(lora))
    apply_patterns(model, [r"layers\.0\.input_layernorm"], [])
    t, ms = _states({"lora": lora, "trainable": {"include": [r"layers\.0\.input_layernorm"]}}, tied)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == t.trainable
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == t.shapes
    assert _step(model, param_groups(model, 0.1, RowGuard())) == (ms["params"], ms["grads"], ms["optimizer"])


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (8, 4)])
def test_agrees_with_deepspeed_estimators(stage, offload, gpus, nodes):
    """bf16 mixed precision, every parameter trained: the per-GPU (and offloaded host) bytes are
    DeepSpeed's own cold estimate (additional_buffer_factor 1: no slack)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    a = M.arch_from_hf({"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8})
    st = StageSpec.model_validate({"name": "s", "mixture": "m", "seq_len": 16, "global_batch_size": 1})
    t = M.stage_tensors(a, st.trainable)
    assert t.n_trainable == 8_030_261_248  # Llama-3-8B
    world = gpus * nodes
    ms = M.model_states(t, stage, "bf16", world, "cpu" if offload else "none", gpus, M.largest_layer_params(a))
    gpu = ms["params"] + ms["grads"] + ms["optimizer"]
    host_per_node = (ms["params_cpu"] + ms["grads_cpu"] + ms["optimizer_cpu"]) * gpus
    if stage == 2:
        cpu_ds, gpu_ds = estimate_zero2_model_states_mem_needs(t.n_trainable, gpus, nodes, offload, 1.0)
    else:
        cpu_ds, gpu_ds, _ = estimate_zero3_model_states_mem_needs(
            t.n_trainable, M.largest_layer_params(a), gpus, nodes, offload, offload, True, 1.0)
    assert gpu == pytest.approx(gpu_ds, rel=1e-9, abs=world + 8)
    if offload:
        assert host_per_node == pytest.approx(cpu_ds, rel=1e-6, abs=world * gpus + 8)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_partitions_two_ranks(tmp_path, stage):
    """The real thing: a tiny Llama under DeepSpeed (CPU, 2 ranks, fp32); each rank's parameter storage,
    fp32 master partition, its gradient and Adam moments against model_states (padding included)."""
    out = tmp_path / "probe.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), str(ROOT / "tests" / "memory_probe.py"), str(out),
                        str(stage)], env=env, cwd=ROOT, timeout=600, capture_output=True, text=True)
    assert r.returncode == 0, "\n".join(l for l in (r.stdout + r.stderr).splitlines() if "Warning" not in l)[-6000:]
    a = M.arch_from_hf(CFG)
    st = StageSpec.model_validate({"name": "s", "mixture": "m", "seq_len": 16, "global_batch_size": 1})
    t = M.stage_tensors(a, st.trainable)
    for r in range(2):
        rec = json.loads(Path(f"{out}.{r}").read_text())
        assert rec["total_params"] == t.n_trainable
        parts = M.zero_partitions(t, stage, 2)
        ms = M.model_states(t, stage, "fp32", 2, largest_layer=0)
        assert ms["optimizer"] == pytest.approx(parts["master"] + parts["moments"], abs=64)
        assert ms["grads"] == pytest.approx(parts["grads"], abs=64)
        assert rec["params"] == parts["params"]
        assert rec["master"] == parts["master"]
        assert rec["grads"] == parts["grads"]
        assert rec["moments"] == parts["moments"]


# --------------------------------------------------------------------------- activations

SHAPES = {  # (arch, seq, micro, fused loss, gradient checkpointing)
    "fused": (dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                   num_attention_heads=4), 1024, 2, True, False),
    "standard": (dict(vocab_size=16000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2), 512, 2, False, False),
    "checkpointed": (dict(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                          num_attention_heads=6), 2048, 1, True, True),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_activation_and_loss_within_25_percent(shape):
    arch, seq, micro, fused, ckpt = SHAPES[shape]
    job = json.dumps({"arch": arch, "seq": seq, "micro": micro, "fused": fused, "ckpt": ckpt})
    # large tensors mmapped (no dynamic threshold): freed memory leaves the RSS, which then follows
    # the live bytes rather than glibc's heap fragmentation
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "131072"}
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "memory_rss.py"), job], env=env, cwd=ROOT,
                       check=True, timeout=600, capture_output=True, text=True)
    measured = json.loads(r.stdout.strip().splitlines()[-1])["increase"]
    a = M.arch_from_hf({**arch, "model_type": "llama"})
    est = M.step_peak(M.activations(a, seq, micro, "fp32", ckpt), M.loss_buffer(a, seq, micro, fused, "fp32",
                                                                                  gpu=False))
    assert abs(est - measured) <= 0.25 * measured, (shape, est, measured, est / measured)


# --------------------------------------------------------------------------- the verdict at preflight


def _probe_report(device: str, *mib: int) -> dict:
    """A node's preflight report in engine/doctor.py's format (torch's view of its GPUs)."""
    return {"device": device, "cuda_available": device == "cuda", "cuda_device_count": len(mib),
            "cuda_devices": [{"index": i, "name": f"GPU{i}", "total_mib": m, "free_mib": m} for i, m in enumerate(mib)],
            "nvml": {"available": bool(mib), "count": len(mib), "devices": []}}


def test_preflight_judges_memory_against_the_smallest_gpu_seen(tmp_path):
    """No gpu_memory_gb in the preset: the smallest GPU of the nodes that train on CUDA (a CPU node is
    ignored) becomes the verdict's capacity, recorded in the plan; a stage that does not fit gets a
    warning naming the stage, the node and the GPU."""
    import yaml as Y

    from cpt_tui.lifecycle import judge_memory
    from cpt_tui.presets import load_checked

    doc = Y.safe_load((ROOT / "presets" / "tiny-demo.yaml").read_text())
    doc["cluster"] = {"kind": "local", "device": "auto"}
    p = tmp_path / "p.yaml"
    p.write_text(Y.safe_dump(doc, sort_keys=False))
    _, preset, plan = load_checked(str(p), check_paths=False)
    need = [st["memory"]["per_process_gpu_bytes"] for st in plan["stages"]]
    assert all(st["memory"]["verdict"] == "unknown GPU memory" for st in plan["stages"])
    small = max(need) // 2**20 - 1  # MiB: just below the largest stage's estimate
    reports = {"a": _probe_report("cuda", 81920, 81920), "b": _probe_report("cuda", small), "c": _probe_report("cpu")}
    warnings = judge_memory(preset, plan, reports)
    mems = [st["memory"] for st in plan["stages"]]
    assert {m["gpu_memory_bytes"] for m in mems} == {small << 20}
    assert all(m["gpu_memory_source"] == f"node b: GPU0 ({small:,} MiB)" for m in mems)
    over = [st["name"] for st, n in zip(plan["stages"], need) if n > small << 20]
    assert over and [m["verdict"] for m in mems if m["per_process_gpu_bytes"] > small << 20] == ["does not fit"] * len(over)
    assert len(warnings) == len(over) and all(f"stage {n}:" in w and "node b: GPU0" in w for n, w in zip(over, warnings))
    # the preset's own capacity wins over the probe; and it is refused where no GPU trains
    doc["cluster"]["gpu_memory_gb"] = 80
    p.write_text(Y.safe_dump(doc, sort_keys=False))
    _, preset, plan = load_checked(str(p), check_paths=False)
    assert judge_memory(preset, plan, reports) == [] and all(st["memory"]["verdict"] == "fits" for st in plan["stages"])
    doc["cluster"]["device"] = "cpu"
    p.write_text(Y.safe_dump(doc, sort_keys=False))
    from cpt_tui.presets import Invalid

    with pytest.raises(Invalid, match="gpu_memory_gb"):
        load_checked(str(p), check_paths=False)
