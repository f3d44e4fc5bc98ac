"""The plan's trainable parameter counts (engine/params.py, arithmetic from the config, no torch in
the manager) equal what the trainer's own code makes trainable in real torch models."""

from __future__ import annotations

import pytest
import yaml

from engine.params import stage_trainable
from engine.spec import parse_preset
from tests.demo_run import ROOT


def _preset(stage_update: dict, arch: dict) -> object:
    d = yaml.safe_load((ROOT / "presets" / "tiny-demo.yaml").read_text())
    d["model"]["config"].update(arch)
    d["stages"] = d["stages"][:1]
    d["stages"][0].update(stage_update)
    return parse_preset(yaml.safe_dump(d))


ARCHES = [
    {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4},
    {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
     "num_key_value_heads": 2, "tie_word_embeddings": True},
]
STAGES = [
    {},
    {"trainable": {"transformer": "frozen", "input_embeddings": "new", "output_embeddings": "new",
                   "old_vocab_size": 2000}},
    {"trainable": {"transformer": "frozen", "input_embeddings": "none", "output_embeddings": "all"}},
    {"trainable": {"include": ["layers\\.0\\.mlp"], "transformer": "frozen"}},
    {"kind": "lora", "lora": {"r": 4}},
    {"kind": "lora", "lora": {"r": 2, "target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj"],
                              "modules_to_save": ["embed_tokens"]}},
    {"kind": "relora", "lora": {"r": 4, "relora": {"merge_every": 5, "warm_start_steps": 3}}},
    # peft's Embedding LoRA (lora_embedding_A/B), the head (tied: the embedding's tensor) as a target and
    # as a trained copy, include / exclude on peft's names
    {"kind": "lora", "lora": {"r": 2, "target_modules": ["embed_tokens", "lm_head"]}},
    {"kind": "lora", "lora": {"r": 2, "modules_to_save": ["lm_head"]},
     "trainable": {"include": ["layers\\.1\\.input_layernorm"], "exclude": ["layers\\.0\\.self_attn\\.q_proj"]}},
]


def _torch_count(preset, arch: dict):
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.lora import apply_lora, lora_params, set_relora_phase
    from engine.trainable import apply_patterns, apply_trainable

    st = preset.stages[0]
    cfg = LlamaConfig(vocab_size=2048, hidden_size=arch["hidden_size"], intermediate_size=arch["intermediate_size"],
                      num_hidden_layers=arch["num_hidden_layers"], num_attention_heads=arch["num_attention_heads"],
                      num_key_value_heads=arch.get("num_key_value_heads", arch["num_attention_heads"]),
                      tie_word_embeddings=arch.get("tie_word_embeddings", False))
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    phases = []

    def count(m):
        n = 0
        for p in {id(p): p for p in m.parameters() if p.requires_grad}.values():
            n += p.numel()
        return n

    if st.lora:  # as Trainer.build
        full = []
        if st.lora.relora and st.lora.relora.warm_start_steps:
            apply_trainable(model, st.trainable, st.trainable.old_vocab_size)
            full = [p for p in model.parameters() if p.requires_grad]
        model = apply_lora(model, st.lora)
        apply_patterns(model, st.trainable.include, st.trainable.exclude)
        if full:
            set_relora_phase(model, True, full)
            phases.append(count(model))
            set_relora_phase(model, False, full)
        phases.append(count(model))
        total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        # peft keeps the original module next to its trainable copy: count the base once
        total -= sum(p.numel() for n, p in model.named_parameters() if "original_module" in n)
        del lora_params
    else:
        guard = apply_trainable(model, st.trainable, st.trainable.old_vocab_size)
        n = count(model)
        for p, _, old in guard.saved:  # guarded rows below old_vocab_size do not learn
            n -= old * p.shape[1]
        phases.append(n)
        total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return phases, total


@pytest.mark.parametrize("arch", range(len(ARCHES)))
@pytest.mark.parametrize("stage", range(len(STAGES)))
def test_counts_match_torch(arch, stage):
    preset = _preset(STAGES[stage], ARCHES[arch])
    got = stage_trainable(preset, 0)
    want_phases, want_total = _torch_count(preset, ARCHES[arch])
    assert [p["trainable"] for p in got["phases"]] == want_phases
    assert got["total"] == want_total

