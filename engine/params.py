"""Which parameters a stage trains, counted from the model's configuration alone (no weights, no torch).

`cpt-tui plan` runs in the manager, which never imports torch: the counts are arithmetic over the
parameter shapes (engine/arch.py) of a Llama-style causal LM (LlamaForCausalLM, and Mistral / Qwen2
which share its layout). The semantics follow the trainer exactly (engine/trainable.py apply_trainable,
engine/lora.py apply_lora / set_relora_phase); tests/test_plan_params.py checks them against real
torch models. `stage_tensors` (which tensors train, by their names in the trained model) is the one
home of those semantics: engine/memory.py sizes gradients and optimizer states from it, and
tests/test_memory_model.py checks its names and shapes against peft's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from engine.arch import Arch, base_arch, extended, numel, param_shapes
from engine.spec import Preset, TrainableSpec

LLAMA_LIKE = ("llama", "mistral", "qwen2")


EMB_IN, EMB_OUT = "model.embed_tokens.weight", "lm_head.weight"


@dataclass
class Tensors:
    """The tensors of a stage by their names in the trained model (peft's names in a LoRA stage):
    name → shape, which of them train, and which are row-guarded (EEVE "new": only the rows from the
    old vocabulary size on learn, yet the whole tensor has a gradient and optimizer moments)."""

    shapes: dict[str, tuple[int, ...]]
    trainable: set[str]
    guarded: set[str] = field(default_factory=set)

    def count(self, names=None) -> int:
        return sum(numel(self.shapes[n]) for n in (self.shapes if names is None else names))

    @property
    def n_trainable(self) -> int:
        return self.count(self.trainable)

    @property
    def n_frozen(self) -> int:
        return self.count() - self.n_trainable


def stage_tensors(a: Arch, trainable: TrainableSpec, lora=None) -> Tensors:
    """Mirrors engine/trainable.py apply_trainable, or engine/lora.py apply_lora (peft) for LoRA stages."""
    shapes = param_shapes(a)
    if lora is not None:
        return _peft_tensors(shapes, trainable, lora)
    on = set(shapes) if trainable.transformer == "trainable" else set()
    guarded = set()
    settings = {EMB_IN: [trainable.input_embeddings]}
    if EMB_OUT in shapes:
        settings[EMB_OUT] = [trainable.output_embeddings]
    else:  # tied: one tensor, the union of both settings
        settings[EMB_IN].append(trainable.output_embeddings)
    for n, modes in settings.items():
        mode = "all" if "all" in modes else "new" if "new" in modes else "none"
        on.discard(n)
        if mode != "none":
            on.add(n)
        if mode == "new":
            guarded.add(n)
    _patterns(shapes, on, trainable.include, trainable.exclude)
    return Tensors(shapes, on, guarded)


def _peft_tensors(shapes: dict, trainable: TrainableSpec, lora) -> Tensors:
    """peft's LoRA model: the base frozen; per targeted Linear A (r × in) and B (out × r), per targeted
    Embedding lora_embedding_A (r × vocab) and _B (hidden × r); each of modules_to_save gets a trained
    copy (the original stays, frozen); then include / exclude on peft's names. A tied head is the
    embedding's tensor, listed once (under the embedding), yet peft can target or copy the lm_head module."""
    out: dict[str, tuple[int, ...]] = {}
    on: set[str] = set()
    targets, saves = list(lora.target_modules), list(lora.modules_to_save)
    tied = EMB_OUT not in shapes
    for n, s in [*shapes.items(), *([(EMB_OUT, shapes[EMB_IN])] if tied else [])]:
        mod, leaf = n.rsplit(".", 1)
        last = mod.rsplit(".", 1)[-1]
        p = "base_model.model." + mod
        listed = not (tied and n == EMB_OUT)  # the tied head's tensor is the embedding's, listed already
        if last in saves:
            if listed:
                out[f"{p}.original_module.{leaf}"] = s
            out[f"{p}.modules_to_save.default.{leaf}"] = s
            on.add(f"{p}.modules_to_save.default.{leaf}")
        elif leaf == "weight" and len(s) == 2 and _lora_target(mod, last, targets):
            if listed:
                out[f"{p}.base_layer.weight"] = s
            if n == EMB_IN:
                ab = (("lora_embedding_A.default", (lora.r, s[0])), ("lora_embedding_B.default", (s[1], lora.r)))
            else:
                ab = (("lora_A.default.weight", (lora.r, s[1])), ("lora_B.default.weight", (s[0], lora.r)))
            for k, shape in ab:
                out[f"{p}.{k}"] = shape
                on.add(f"{p}.{k}")
        elif leaf == "bias" and _lora_target(mod, last, targets):
            out[f"{p}.base_layer.bias"] = s
        elif listed:
            out["base_model.model." + n] = s
    _patterns(out, on, trainable.include, trainable.exclude)
    return Tensors(out, on)


def _lora_target(mod: str, last: str, targets: list[str]) -> bool:
    # peft: a list of names matches a module whose name ends with ".<target>" (or is it)
    return any(mod == t or mod.endswith("." + t) or last == t for t in targets)


def _patterns(shapes, on: set, include: list[str], exclude: list[str]) -> None:
    for pats, flag in ((include, True), (exclude, False)):
        for pat in pats:
            for n in shapes:
                if re.search(pat, n):
                    (on.add if flag else on.discard)(n)


def _elements(a: Arch, t: Tensors, old_vocab: Optional[int], guard_rows: bool) -> dict[str, int]:
    """name → elements that learn: a row-guarded tensor's new rows only (`guard_rows`: not in a
    ReLoRA warm start, which trains whole tensors)."""
    new = max(0, a.vocab_size - old_vocab) * a.hidden_size if guard_rows and old_vocab else None
    return {n: 0 if n not in t.trainable else new if new is not None and n in t.guarded else numel(s)
            for n, s in t.shapes.items()}


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
    old = st.trainable.old_vocab_size or prepared_old_vocab or (old_vocab if preset.vocabulary else None)
    exact = preset.vocabulary is None  # an extension's size is an estimate until it is built
    full = stage_tensors(a, st.trainable)
    if not st.lora:
        on = _elements(a, full, old, guard_rows=True)
        n, total = sum(on.values()), full.count()
        return {"total": total, "trainable": n, "share": n / total, "exact": exact,
                "phases": [{"steps": None, "what": _describe(on, full.shapes), "trainable": n}]}
    t = stage_tensors(a, st.trainable, st.lora)
    # a module trained in full replaces its frozen original: the original is not counted twice
    lora_total = t.count() - t.count(n for n in t.shapes if ".original_module." in n)
    after = t.n_trainable
    targeted = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in t.shapes if ".lora_" in n})
    what = (f"LoRA r={st.lora.r} adapters on {', '.join(targeted) or 'no module'}"
            + (f" + {', '.join(st.lora.modules_to_save)} in full" if st.lora.modules_to_save else "")
            + "; the base model is frozen")
    if st.trainable.include or st.trainable.exclude:
        what += " (trainable.include / exclude also apply, to peft's parameter names)"
    phases = []
    r = st.lora.relora
    if r and r.warm_start_steps:
        on = _elements(a, full, old, guard_rows=False)
        warm = sum(on.values())
        phases.append({"steps": f"1-{r.warm_start_steps}", "what": "warm start, full rank: " + _describe(on, full.shapes)
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
    emb, head = EMB_IN, EMB_OUT
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
