"""The chunked head + cross-entropy (engine/loss.py) against transformers' own loss."""

from __future__ import annotations

import pytest
import torch

from engine.loss import (HiddenHead, fused_head_unsupported, install_head, linear_cross_entropy, restore_head,
                         shifted_targets)
from engine.spec import LoraSpec, TrainableSpec
from engine.trainable import apply_trainable


def _tiny(tied=False, vocab=96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, tie_word_embeddings=tied))


def _grads(model, loss_fn, x):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(x)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [7, 64, 10_000])  # uneven, several, one chunk
def test_fused_loss_and_gradients_equal_the_standard_ones(tied, chunk):
    model = _tiny(tied=tied)
    x = torch.randint(0, 96, (3, 40))
    ref_loss, ref = _grads(model, lambda x: model(input_ids=x, labels=x).loss, x)
    head = install_head(model)
    assert model.lm_head is head and (head.weight is model.model.embed_tokens.weight) == tied
    loss, got = _grads(model, lambda x: linear_cross_entropy(model(input_ids=x).logits, head.weight,
                                                              shifted_targets(x), chunk=chunk), x)
    assert torch.allclose(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert got.keys() == ref.keys()
    for n in ref:
        assert torch.allclose(got[n], ref[n], atol=1e-6, rtol=1e-5), n
    with torch.no_grad():  # evaluation path: loss only
        assert torch.allclose(linear_cross_entropy(model(input_ids=x).logits, head.weight, shifted_targets(x)),
                              ref_loss, atol=1e-6)


def test_fused_loss_is_deterministic_and_respects_frozen_and_guarded_rows():
    model = _tiny()
    guard = apply_trainable(model, TrainableSpec(input_embeddings="new", output_embeddings="new",
                                                 transformer="frozen"), 80)
    head = install_head(model)
    x = torch.randint(0, 96, (2, 33))
    f = lambda x: linear_cross_entropy(model(input_ids=x).logits, head.weight, shifted_targets(x), chunk=16)  # noqa: E731
    l1, g1 = _grads(model, f, x)
    l2, g2 = _grads(model, f, x)
    assert torch.equal(l1, l2) and all(torch.equal(g1[n], g2[n]) for n in g1)  # bit-identical reruns
    assert set(g1) == {"model.embed_tokens.weight", "lm_head.weight"}  # frozen transformer: no gradient
    assert not g1["lm_head.weight"][:80].any() and g1["lm_head.weight"][80:].any()  # the guard's hook still applies
    assert guard


def test_bf16_autocast_stays_close():
    model = _tiny()
    x = torch.randint(0, 96, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(input_ids=x, labels=x).loss.item()
        head = install_head(model)
        loss = linear_cross_entropy(model(input_ids=x).logits, head.weight, shifted_targets(x))
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref) < 2e-2
    assert model.lm_head.weight.grad.dtype == torch.float32


def test_install_keeps_the_state_dict_and_restore_gives_back_the_linear(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tiny()
    keys = list(model.state_dict())
    linear = model.lm_head
    install_head(model)
    assert list(model.state_dict()) == keys  # checkpoints written while training read back unchanged
    restore_head(model)
    assert model.lm_head is linear
    model.save_pretrained(tmp_path)
    x = torch.randint(0, 96, (1, 12))
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(again(input_ids=x).logits, model(input_ids=x).logits)


def test_unsupported_heads_fall_back_with_a_reason():
    from engine.lora import apply_lora

    assert fused_head_unsupported(_tiny(), zero3=False) is None
    assert "ZeRO-3" in fused_head_unsupported(_tiny(), zero3=True)
    lora = apply_lora(_tiny(), LoraSpec(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert "modules_to_save" in fused_head_unsupported(lora, zero3=False)
    plain_lora = apply_lora(_tiny(), LoraSpec(r=4, alpha=8, target_modules=["q_proj"]))
    assert fused_head_unsupported(plain_lora, zero3=False) is None
    assert isinstance(install_head(plain_lora), HiddenHead)
    model = _tiny()
    model.config.model_type = "gemma2"  # soft-capped logits
    assert "gemma2" in fused_head_unsupported(model, zero3=False)
