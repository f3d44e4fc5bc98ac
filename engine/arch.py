"""A model's architecture from its configuration alone (no weights, no torch): the one home of the
shapes that `cpt-tui plan` reasons about — trainable parameter counts (engine/params.py) and memory
and time before launch (engine/memory.py).

`Arch` is read from a Hugging Face config.json (a local model directory, or a hub model already in
the local cache: nothing is downloaded) or from a preset's `model.config`; `param_shapes` lists every
parameter tensor under the name `named_parameters()` gives it in the Hugging Face model, so
`trainable.include/exclude` regexes and LoRA `target_modules` select here what they select there.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Optional


@dataclass(frozen=True)
class Arch:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    family: str = "llama"  # the config's model_type
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim


def arch_from_hf(cfg: dict) -> Arch:
    """From a Hugging Face config.json (Llama, Mistral, Qwen2/3, OLMo, SmolLM3-style decoders)."""
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = cfg["text_config"]
    heads = cfg["num_attention_heads"]
    family = cfg.get("model_type", "llama")
    return Arch(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), family=family,
        attention_bias=bool(cfg.get("attention_bias", family == "qwen2")), mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=family in ("qwen3", "olmo2"))


def arch_from_spec(arch, vocab_size: int) -> Arch:
    """From a preset's `model.config` (engine.spec.ArchConfig), as engine/model.py builds it."""
    return Arch(vocab_size=arch.vocab_size or vocab_size, hidden_size=arch.hidden_size,
                intermediate_size=arch.intermediate_size, num_hidden_layers=arch.num_hidden_layers,
                num_attention_heads=arch.num_attention_heads,
                num_key_value_heads=arch.num_key_value_heads or arch.num_attention_heads,
                head_dim=arch.hidden_size // arch.num_attention_heads, tie_word_embeddings=arch.tie_word_embeddings)


@lru_cache(maxsize=64)
def config_json(ref: str) -> Optional[dict]:
    """config.json of a local model directory or a hub model already in the local cache; read once."""
    from engine.data.sources import DataError, expand_path

    try:
        path: Optional[str] = os.path.join(expand_path(ref), "config.json")
    except DataError:
        path = None
    if path is None or not os.path.isfile(path):
        try:  # a hub id already in the local cache (nothing is downloaded)
            from huggingface_hub import try_to_load_from_cache
            hit = try_to_load_from_cache(ref, "config.json")
            path = hit if isinstance(hit, str) else None
        except Exception:
            path = None
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _tokenizer_size(preset) -> Optional[int]:
    """The length of the preset's own tokenizer (tokenizer.json: vocabulary + added tokens), if on disk."""
    if preset.tokenizer.train is not None:
        return preset.tokenizer.train.vocab_size
    if not preset.tokenizer.path:
        return None
    from engine.data.sources import expand_path

    try:
        with open(os.path.join(expand_path(preset.tokenizer.path), "tokenizer.json"), encoding="utf-8") as f:
            tj = json.load(f)
        vocab = tj["model"]["vocab"]
        return len(vocab) + len([t for t in tj.get("added_tokens", []) if t["content"] not in vocab])
    except Exception:
        return None


def base_arch(preset) -> tuple[Optional[Arch], str]:
    """The starting model's architecture (before any vocabulary extension), or (None, why not)."""
    m = preset.model
    if m.config is not None:
        vocab = m.config.vocab_size or _tokenizer_size(preset)
        if vocab is None:
            return None, "the tokenizer's size is not known before preparation"
        return arch_from_spec(m.config, vocab), ""
    cfg = config_json(m.path)
    if cfg is None:
        return None, f"{m.path}: config.json not available before download"
    return arch_from_hf(cfg), ""


def extended(a: Arch, preset) -> Arch:
    """The architecture after the preset's vocabulary extension, padded as engine/vocab.py pads it (an
    estimate when `new_tokens` is given: fewer may be found)."""
    v = preset.vocabulary
    if v is None:
        return a
    n = v.target_vocab_size if v.target_vocab_size is not None else a.vocab_size + v.new_tokens
    return with_vocab(a, -(-n // v.pad_to_multiple_of) * v.pad_to_multiple_of)


def with_vocab(a: Arch, vocab_size: int) -> Arch:
    return replace(a, vocab_size=vocab_size)


def param_shapes(a: Arch) -> dict[str, tuple[int, ...]]:
    """Every parameter tensor of the Hugging Face model, by its `named_parameters()` name (tied: once)."""
    h, i = a.hidden_size, a.intermediate_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (a.vocab_size, h)}
    for n in range(a.num_hidden_layers):
        p = f"model.layers.{n}."
        for proj, o, inp in (("q", a.q_width, h), ("k", a.kv_width, h), ("v", a.kv_width, h), ("o", h, a.q_width)):
            out[f"{p}self_attn.{proj}_proj.weight"] = (o, inp)
            if a.attention_bias and proj != "o":
                out[f"{p}self_attn.{proj}_proj.bias"] = (o,)
        if a.attention_bias and a.family != "qwen2":
            out[f"{p}self_attn.o_proj.bias"] = (h,)
        if a.qk_norm:
            out[f"{p}self_attn.q_norm.weight"] = (a.head_dim,)
            out[f"{p}self_attn.k_norm.weight"] = (a.head_dim,)
        for proj, o, inp in (("gate", i, h), ("up", i, h), ("down", h, i)):
            out[f"{p}mlp.{proj}_proj.weight"] = (o, inp)
            if a.mlp_bias:
                out[f"{p}mlp.{proj}_proj.bias"] = (o,)
        out[f"{p}input_layernorm.weight"] = (h,)
        out[f"{p}post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    if not a.tie_word_embeddings:
        out["lm_head.weight"] = (a.vocab_size, h)
    return out


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def count_params(a: Arch) -> int:
    return sum(numel(s) for s in param_shapes(a).values())
