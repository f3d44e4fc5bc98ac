"""Building and loading models (torch is imported only here and in the trainer)."""

from __future__ import annotations

from pathlib import Path

from engine.spec import ArchConfig


def build_from_config(arch: ArchConfig, vocab_size: int, out_dir: str | Path, seed: int, tokenizer=None) -> None:
    """A Llama-style model initialised from `arch`, saved in Hugging Face format."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=arch.vocab_size or vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads or arch.num_attention_heads,
        max_position_embeddings=arch.max_position_embeddings,
        rope_theta=arch.rope_theta,
        tie_word_embeddings=arch.tie_word_embeddings,
    )
    if tokenizer is not None:
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = (
            tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
