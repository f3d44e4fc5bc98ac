"""LoRA (through peft) and ReLoRA: merge the low-rank update into the base, re-initialise, repeat.

LoRA: the base stays frozen; only the adapters (and `modules_to_save`, trained in full) learn. The
exported model has the adapters merged in (`export_model`), and the adapter itself is saved too.

ReLoRA (Lialin et al. 2023): optional full-rank warm start, then every `merge_every` steps
W += B·A·scale, A re-initialised (Kaiming, from a generator seeded by the step so every rank and
every resume draws the same numbers), B = 0 — so the function is unchanged by a merge — and the
adapters' optimizer state is reset or magnitude-pruned. The jagged LR lives in engine.schedule.
"""

from __future__ import annotations

import math

import torch

from engine.spec import LoraSpec


def apply_lora(model, spec: LoraSpec):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                     target_modules=list(spec.target_modules), modules_to_save=list(spec.modules_to_save) or None,
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def lora_params(model) -> list[torch.nn.Parameter]:
    out = []
    for m in lora_layers(model):
        for d in (m.lora_A, m.lora_B):
            out.extend(p for sub in d.values() for p in sub.parameters())
    return out


def base_weights(model) -> list[torch.nn.Parameter]:
    """The frozen base matrices under the adapters (what a ReLoRA warm start trains in full)."""
    return [m.get_base_layer().weight for m in lora_layers(model)]


def set_relora_phase(model, warm: bool, full_rank: list[torch.nn.Parameter]) -> None:
    """Warm start: `full_rank` params learn, adapters do not; afterwards the reverse."""
    adapters = {id(p) for p in lora_params(model)}
    for p in full_rank:
        if id(p) not in adapters:
            p.requires_grad_(warm)
    for p in lora_params(model):
        p.requires_grad_(not warm)


@torch.no_grad()
def merge_and_reinit(model, seed: int) -> float:
    """W += ΔW for every adapter, then A ← Kaiming, B ← 0. Returns ‖ΔW‖ summed over layers."""
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for m in lora_layers(model):
        for name in list(m.lora_A):
            delta = m.get_delta_weight(name)
            w = m.get_base_layer().weight
            w.add_(delta.to(w.dtype))
            total += float(delta.float().norm())
            a, b = m.lora_A[name].weight, m.lora_B[name].weight
            # peft's default init (kaiming_uniform, a=√5), drawn on the CPU for reproducibility
            fresh = torch.empty(a.shape, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)
            a.copy_(fresh.to(a.dtype))
            b.zero_()
    return total


@torch.no_grad()
def reset_optimizer_state(optimizer, params: list[torch.nn.Parameter], mode: str, prune_ratio: float) -> None:
    """ReLoRA's partial reset of the adapters' Adam moments: drop them, or keep the largest (1 - ratio)."""
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            continue
        if mode == "optimizer":
            for k in ("exp_avg", "exp_avg_sq"):
                if k in state:
                    state[k].zero_()
            continue
        for k in ("exp_avg", "exp_avg_sq"):
            t = state.get(k)
            if t is None or t.numel() == 0:
                continue
            n_drop = int(t.numel() * prune_ratio)
            if n_drop <= 0:
                continue
            if n_drop >= t.numel():
                t.zero_()
                continue
            thresh = t.abs().flatten().kthvalue(n_drop).values
            t.mul_(t.abs() > thresh)


def export_model(model):
    """The plain transformers model to save: adapters merged into the base (a copy-free unwrap)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model
