"""Which parameters a stage trains, counted from the model's configuration alone (no weights, no torch).

`cpt-tui plan` runs in the manager, which never imports torch: the counts are arithmetic over the
parameter shapes (engine/arch.py) of a Llama-style causal LM (LlamaForCausalLM, and Mistral / Qwen2
which share its layout). The semantics follow the trainer exactly (engine/trainable.py apply_trainable,
engine/lora.py apply_lora / set_relora_phase); tests/test_plan_params.py checks them against real
torch models.
"""

from __future__ import annotations

import re
from typing import Optional

from engine.arch import Arch, base_arch, extended, numel, param_shapes
from engine.spec import Preset, StageSpec, TrainableSpec

LLAMA_LIKE = ("llama", "mistral", "qwen2")


def _full_rank(a: Arch, sh: dict, spec: TrainableSpec, old_vocab: Optional[int], guard_rows: bool) -> dict[str, int]:
    """apply_trainable: name → elements that learn. `guard_rows`: "new" rows are guarded (not in a LoRA stage)."""
    on = {n: (numel(s) if spec.transformer == "trainable" else 0) for n, s in sh.items()}
    emb = "model.embed_tokens.weight"
    heads = [(emb, [spec.input_embeddings] + ([spec.output_embeddings] if a.tie_word_embeddings else []))]
    if not a.tie_word_embeddings:
        heads.append(("lm_head.weight", [spec.output_embeddings]))
    for name, modes in heads:
        mode = "all" if "all" in modes else "new" if "new" in modes else "none"
        full = numel(sh[name])
        if mode == "new" and guard_rows and old_vocab:
            on[name] = max(0, a.vocab_size - old_vocab) * a.hidden_size
        else:
            on[name] = 0 if mode == "none" else full
    for pats, flag in ((spec.include, True), (spec.exclude, False)):
        for pat in pats:
            for n in sh:
                if re.search(pat, n):
                    on[n] = numel(sh[n]) if flag else 0
    return on


def _lora(a: Arch, sh: dict, stage: StageSpec) -> tuple[int, list[str], int]:
    """Adapter elements (A: r × in, B: out × r per targeted Linear) and the modules trained in full."""
    spec = stage.lora
    n = 0
    targeted: set[str] = set()
    for name, shp in sh.items():
        if not name.endswith(".weight") or len(shp) != 2:
            continue
        mod = name[: -len(".weight")]
        if mod in ("model.embed_tokens",):
            continue
        if any(mod == t or mod.endswith("." + t) for t in spec.target_modules):
            out_f, in_f = shp
            n += spec.r * (in_f + out_f)
            targeted.add(mod.rsplit(".", 1)[-1])
    saved = 0
    for t in spec.modules_to_save:
        for name, shp in sh.items():
            mod = name.rsplit(".", 1)[0]
            if mod == t or mod.endswith("." + t):
                saved += numel(shp)
        if t == "lm_head" and a.tie_word_embeddings:
            saved += a.vocab_size * a.hidden_size  # peft copies the head's (tied) weight into its own trainable module
    return n, sorted(targeted), saved


def stage_trainable(preset: Preset, index: int, prepared_old_vocab: Optional[int] = None) -> dict:
    """{"total", "trainable", "share", "exact", "phases": [{"steps", "what", "trainable"}], "note"} of a stage;
    {"note": why} when the architecture is not known before preparation."""
    a, why = base_arch(preset)
    if a is None:
        return {"note": why}
    if a.family not in LLAMA_LIKE:
        return {"note": f"model_type {a.family!r}: counts are computed for Llama-style models only"}
    old_vocab = a.vocab_size
    a = extended(a, preset)
    st = preset.stages[index]
    sh = param_shapes(a)
    total = sum(numel(s) for s in sh.values())
    old = st.trainable.old_vocab_size or prepared_old_vocab or (old_vocab if preset.vocabulary else None)
    exact = preset.vocabulary is None  # an extension's size is an estimate until it is built
    if not st.lora:
        on = _full_rank(a, sh, st.trainable, old, guard_rows=True)
        n = sum(on.values())
        return {"total": total, "trainable": n, "share": n / total, "exact": exact,
                "phases": [{"steps": None, "what": _describe(on, sh), "trainable": n}]}
    adapters, targeted, saved = _lora(a, sh, st)
    lora_total = total + adapters  # a module trained in full replaces its frozen original
    after = adapters + saved
    what = (f"LoRA r={st.lora.r} adapters on {', '.join(targeted) or 'no module'}"
            + (f" + {', '.join(st.lora.modules_to_save)} in full" if st.lora.modules_to_save else "")
            + "; the base model is frozen")
    if st.trainable.include or st.trainable.exclude:
        exact = False
        what += " (trainable.include / exclude also apply, to peft's parameter names)"
    phases = []
    r = st.lora.relora
    if r and r.warm_start_steps:
        on = _full_rank(a, sh, st.trainable, old, guard_rows=False)
        warm = sum(on.values())
        phases.append({"steps": f"1-{r.warm_start_steps}", "what": "warm start, full rank: " + _describe(on, sh)
                       + "; adapters frozen", "trainable": warm})
        phases.append({"steps": f"{r.warm_start_steps + 1}-", "what": what + (f", merged every {r.merge_every} steps"),
                       "trainable": after})
    else:
        if r:
            what += f", merged into the base every {r.merge_every} steps"
        phases.append({"steps": None, "what": what, "trainable": after})
    n = max(p["trainable"] for p in phases)
    return {"total": lora_total, "trainable": phases[-1]["trainable"], "share": phases[-1]["trainable"] / lora_total,
            "exact": exact, "phases": phases, "max_trainable": n}


def _describe(on: dict[str, int], sh: dict) -> str:
    """A short statement of what learns: embeddings, head, transformer blocks (all / some / none)."""
    emb, head = "model.embed_tokens.weight", "lm_head.weight"
    parts = []

    def rows(name: str, label: str) -> None:
        full = numel(sh[name])
        if on[name] == full:
            parts.append(f"{label} all rows")
        elif on[name]:
            parts.append(f"{label} {on[name] // sh[name][1]:,} new rows")
        else:
            parts.append(f"{label} frozen")

    rows(emb, "input embeddings" + (" (tied head)" if head not in sh else ""))
    if head in sh:
        rows(head, "output embeddings")
    body = [n for n in sh if n not in (emb, head)]
    k = sum(1 for n in body if on[n])
    parts.append("transformer " + ("trainable" if k == len(body) else "frozen" if k == 0 else f"{k}/{len(body)} tensors"))
    return ", ".join(parts)
