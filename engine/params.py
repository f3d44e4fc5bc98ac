"""Which parameters a stage trains, counted from the model's configuration alone (no weights, no torch).

`cpt-tui plan` runs in the manager, which never imports torch: the counts are arithmetic over the
parameter shapes of a Llama-style causal LM (LlamaForCausalLM, and Mistral / Qwen2 which share its
layout): embeddings, attention q/k/v/o with grouped-query heads, the gated MLP, RMSNorms and an
untied or tied head. The semantics follow the trainer exactly (engine/trainable.py apply_trainable,
engine/lora.py apply_lora / set_relora_phase); tests/test_plan_params.py checks them against real
torch models.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from engine.spec import Preset, StageSpec, TrainableSpec

LLAMA_LIKE = ("llama", "mistral", "qwen2")


@dataclass
class Arch:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    exact_vocab: bool = True  # False: the vocabulary size is an estimate (a vocabulary extension to come)


def arch_from_hf(conf: dict) -> Optional[Arch]:
    """An HF config.json of a Llama-style model, or None for another architecture."""
    if conf.get("model_type") not in LLAMA_LIKE:
        return None
    h, heads = conf["hidden_size"], conf["num_attention_heads"]
    bias = bool(conf.get("attention_bias", False))
    qwen = conf.get("model_type") == "qwen2"
    return Arch(vocab=conf["vocab_size"], hidden=h, intermediate=conf["intermediate_size"],
                layers=conf["num_hidden_layers"], heads=heads, kv_heads=conf.get("num_key_value_heads") or heads,
                head_dim=conf.get("head_dim") or h // heads, tied=bool(conf.get("tie_word_embeddings", False)),
                qkv_bias=bias or qwen, o_bias=bias, mlp_bias=bool(conf.get("mlp_bias", False)))


@lru_cache(maxsize=64)
def _hf_config(ref: str) -> Optional[dict]:
    """config.json of a local model directory or a cached hub model (never downloaded); read once."""
    from engine.data.sources import DataError, expand_path

    try:
        d = expand_path(ref)
    except DataError:
        return None
    path = os.path.join(d, "config.json")
    if not os.path.isfile(path):
        try:  # a hub id already in the local cache (nothing is downloaded)
            from huggingface_hub import try_to_load_from_cache
            p = try_to_load_from_cache(ref, "config.json")
            path = p if isinstance(p, str) else None
        except Exception:
            path = None
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def base_arch(preset: Preset) -> tuple[Optional[Arch], str]:
    """The starting model's architecture, or (None, why not)."""
    m = preset.model
    if m.config is not None:
        c = m.config
        vocab = c.vocab_size
        exact = True
        if vocab is None:
            if preset.tokenizer.train is not None:
                vocab = preset.tokenizer.train.vocab_size
            else:
                tk = None
                if preset.tokenizer.path:
                    from engine.data.sources import expand_path
                    try:
                        with open(os.path.join(expand_path(preset.tokenizer.path), "tokenizer.json"), encoding="utf-8") as f:
                            tj = json.load(f)
                        tk = len(tj["model"]["vocab"]) + len([t for t in tj.get("added_tokens", [])
                                                              if t["content"] not in tj["model"]["vocab"]])
                    except Exception:
                        tk = None
                if tk is None:
                    return None, "the tokenizer's size is not known before preparation"
                vocab = tk
        return Arch(vocab=vocab, hidden=c.hidden_size, intermediate=c.intermediate_size, layers=c.num_hidden_layers,
                    heads=c.num_attention_heads, kv_heads=c.num_key_value_heads or c.num_attention_heads,
                    head_dim=c.hidden_size // c.num_attention_heads, tied=c.tie_word_embeddings,
                    exact_vocab=exact), ""
    conf = _hf_config(m.path)
    if conf is None:
        return None, f"{m.path}: config.json not available before download"
    a = arch_from_hf(conf)
    if a is None:
        return None, f"model_type {conf.get('model_type')!r}: counts are computed for Llama-style models only"
    return a, ""


def extended(a: Arch, preset: Preset) -> Arch:
    """The architecture after the preset's vocabulary extension (an estimate when `new_tokens` is given:
    fewer may be found; the padding to a multiple of pad_to_multiple_of is applied)."""
    v = preset.vocabulary
    if v is None:
        return a
    n = v.target_vocab_size if v.target_vocab_size is not None else a.vocab + v.new_tokens
    m = v.pad_to_multiple_of
    n = -(-n // m) * m
    return Arch(**{**a.__dict__, "vocab": n, "exact_vocab": False})


def shapes(a: Arch) -> dict[str, tuple[int, ...]]:
    """Parameter name → shape, as LlamaForCausalLM.named_parameters() lists them (a tied head once)."""
    h, q, kv = a.hidden, a.heads * a.head_dim, a.kv_heads * a.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (a.vocab, h)}
    for i in range(a.layers):
        p = f"model.layers.{i}."
        for name, shp, bias in (("self_attn.q_proj", (q, h), a.qkv_bias), ("self_attn.k_proj", (kv, h), a.qkv_bias),
                                ("self_attn.v_proj", (kv, h), a.qkv_bias), ("self_attn.o_proj", (h, q), a.o_bias),
                                ("mlp.gate_proj", (a.intermediate, h), a.mlp_bias),
                                ("mlp.up_proj", (a.intermediate, h), a.mlp_bias),
                                ("mlp.down_proj", (h, a.intermediate), a.mlp_bias)):
            out[p + name + ".weight"] = shp
            if bias:
                out[p + name + ".bias"] = (shp[0],)
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    if not a.tied:
        out["lm_head.weight"] = (a.vocab, h)
    return out


def _numel(shp: tuple[int, ...]) -> int:
    n = 1
    for d in shp:
        n *= d
    return n


def _full_rank(a: Arch, sh: dict, spec: TrainableSpec, old_vocab: Optional[int], guard_rows: bool) -> dict[str, int]:
    """apply_trainable: name → elements that learn. `guard_rows`: "new" rows are guarded (not in a LoRA stage)."""
    on = {n: (_numel(s) if spec.transformer == "trainable" else 0) for n, s in sh.items()}
    emb = "model.embed_tokens.weight"
    heads = [(emb, [spec.input_embeddings] + ([spec.output_embeddings] if a.tied else []))]
    if not a.tied:
        heads.append(("lm_head.weight", [spec.output_embeddings]))
    for name, modes in heads:
        mode = "all" if "all" in modes else "new" if "new" in modes else "none"
        full = _numel(sh[name])
        if mode == "new" and guard_rows and old_vocab:
            on[name] = max(0, a.vocab - old_vocab) * a.hidden
        else:
            on[name] = 0 if mode == "none" else full
    for pats, flag in ((spec.include, True), (spec.exclude, False)):
        for pat in pats:
            for n in sh:
                if re.search(pat, n):
                    on[n] = _numel(sh[n]) if flag else 0
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
                saved += _numel(shp)
        if t == "lm_head" and a.tied:
            saved += a.vocab * a.hidden  # peft copies the head's (tied) weight into its own trainable module
    return n, sorted(targeted), saved


def stage_trainable(preset: Preset, index: int, prepared_old_vocab: Optional[int] = None) -> dict:
    """{"total", "trainable", "share", "exact", "phases": [{"steps", "what", "trainable"}], "note"} of a stage;
    {"note": why} when the architecture is not known before preparation."""
    a, why = base_arch(preset)
    if a is None:
        return {"note": why}
    old_vocab = a.vocab
    a = extended(a, preset)
    st = preset.stages[index]
    sh = shapes(a)
    total = sum(_numel(s) for s in sh.values())
    old = st.trainable.old_vocab_size or prepared_old_vocab or (old_vocab if preset.vocabulary else None)
    exact = a.exact_vocab
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
        full = _numel(sh[name])
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
