"""In-process checks of the engine's pieces: schedules, the event schema, trainable rows, ReLoRA merges."""

from __future__ import annotations

import math

import pytest
import torch

from engine.events import EventWriter, read_events, validate_event, validate_log
from engine.schedule import Schedule
from engine.spec import LoraSpec, ScheduleSpec, TrainableSpec


def _tiny(tied=False, vocab=96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, tie_word_embeddings=tied))


# lr(k) pinned at chosen steps, computed by hand from each schedule's definition (lr 1, min_lr 0.1,
# 100 steps, warmup 10 → decay over steps 10..99, span 90; WSD decays over the last 20%, span 20).
_PINNED = {
    "constant": {10: 1.0, 40: 1.0, 99: 1.0},
    "inverse_sqrt": {10: math.sqrt(10 / 11), 39: 0.5, 99: math.sqrt(10 / 100)},  # sqrt(warmup / (k + 1))
    "linear": {10: 1.0, 40: 0.1 + 0.9 * (1 - 30 / 90), 55: 0.55, 99: 0.1 + 0.9 / 90},
    "cosine": {10: 1.0, 40: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 3)), 55: 0.55,
               70: 0.1 + 0.9 * 0.5 * (1 + math.cos(2 * math.pi / 3)), 99: 0.1 + 0.45 * (1 + math.cos(math.pi * 89 / 90))},
    "wsd": {10: 1.0, 79: 1.0, 80: 1.0, 90: 0.55, 99: 0.1 + 0.9 / 20},
}


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "wsd", "inverse_sqrt"])
def test_schedules_warm_up_then_follow_their_shape(name):
    s = Schedule(ScheduleSpec(name=name, lr=1.0, min_lr=0.1, warmup_ratio=0.1), total=100)
    lrs = [s.lr(i) for i in range(100)]
    assert s.warmup == 10 and lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[:10] == pytest.approx([(k + 1) / 10 for k in range(10)])  # linear warmup
    assert all(0.1 - 1e-9 <= x <= 1.0 + 1e-9 for x in lrs[10:])
    pinned = _PINNED[name]
    assert {k: lrs[k] for k in pinned} == pytest.approx(pinned)
    if name in ("cosine", "linear", "inverse_sqrt"):
        assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    if name == "wsd":
        assert lrs[10:80] == [1.0] * 70
    if name == "constant":
        assert lrs[10:] == [1.0] * 90
    # the floor: inverse_sqrt never goes below min_lr however long the stage
    if name == "inverse_sqrt":
        assert Schedule(ScheduleSpec(name=name, lr=1.0, min_lr=0.2, warmup_steps=4), total=10_000).lr(9_999) == 0.2


def test_schedule_restart_and_jagged_rewarmup():
    spec = ScheduleSpec(name="linear", lr=1.0, min_lr=0.0, warmup_steps=4)
    fresh = Schedule(spec, total=100, start=40)  # load_lr_scheduler: false at step 40 → warm up again
    assert fresh.lr(40) == pytest.approx(0.25) and fresh.lr(43) == pytest.approx(1.0)
    jag = Schedule(ScheduleSpec(name="constant", lr=1.0), total=50, restarts=[10, 20], rewarmup=5)
    assert [jag.lr(i) for i in (9, 10, 12, 14, 19, 20)] == pytest.approx([1, 0.2, 0.6, 1, 1, 0.2])


def test_event_schema_validator(tmp_path):
    w = EventWriter(tmp_path / "e.jsonl", "s")
    w.emit("status", state="running", step=0, total_steps=3, resumed_from=None)
    w.emit("metric", step=1, tokens=64, loss=float("nan"), lr=1e-3, grad_norm=None, tokens_per_s=10.0, total_steps=3)
    w.emit("eval", step=1, tokens=64, domain="code", loss=2.5, blocks=4)
    w.close()
    recs, _ = read_events(tmp_path / "e.jsonl")
    errs = validate_log(recs)
    assert errs == ["seq 2: field 'loss' has type NoneType"]  # NaN is written as null: not a valid metric
    assert validate_event({**recs[0], "state": "sleeping"}) == ["unknown status state 'sleeping'"]
    assert validate_event({**recs[2], "extra": 1}) == ["unknown field 'extra' for type 'eval'"]
    assert "missing field 'domain'" in validate_event({k: v for k, v in recs[2].items() if k != "domain"})
    assert validate_event({**recs[0], "type": "bogus"}) == ["unknown type 'bogus'"]


def test_a_reopened_event_log_continues_after_its_last_complete_record(tmp_path):
    """A restarted attempt's EventWriter drops a torn last line, continues the sequence, and knows the
    last step earlier attempts logged a metric / eval for (what its trackers must not log twice)."""
    path = tmp_path / "e.jsonl"
    assert (EventWriter(path, "s").seq, EventWriter(path, "s").logged_upto) == (0, -1)
    w = EventWriter(path, "s")
    w.emit("metric", step=7, tokens=64, loss=2.0, lr=1e-3, grad_norm=1.0, tokens_per_s=10.0, total_steps=9)
    w.emit("eval", step=8, tokens=64, domain="code", loss=2.5, blocks=4)
    w.emit("status", state="running", step=8, total_steps=9, resumed_from=None)
    w.close()
    whole = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"v": 1, "seq": 4, "type": "metric", "step": 9')  # killed mid-write
    again = EventWriter(path, "s")
    assert (again.seq, again.logged_upto) == (3, 8) and path.read_bytes() == whole
    again.emit("metric", step=9, tokens=64, loss=1.9, lr=1e-3, grad_norm=1.0, tokens_per_s=10.0, total_steps=9)
    again.close()
    assert [r["seq"] for r in read_events(path)[0]] == [1, 2, 3, 4] and EventWriter(path, "s").logged_upto == 9


def test_tied_embeddings_train_the_union_of_rows():
    from engine.trainable import apply_trainable

    m = _tiny(tied=True)
    g = apply_trainable(m, TrainableSpec(input_embeddings="none", output_embeddings="new", transformer="frozen"), 64)
    emb = m.get_input_embeddings().weight
    assert emb.requires_grad and g.params() == [emb]  # one tensor, guarded once
    assert not any(p.requires_grad for n, p in m.named_parameters() if "embed" not in n and "lm_head" not in n)
    m = _tiny(tied=True)
    g = apply_trainable(m, TrainableSpec(input_embeddings="none", output_embeddings="all", transformer="frozen"), 64)
    assert not g and m.get_input_embeddings().weight.requires_grad  # EEVE 4 when tied: all embeddings
    with pytest.raises(ValueError, match="trains no parameter"):
        apply_trainable(_tiny(), TrainableSpec(input_embeddings="none", output_embeddings="none",
                                               transformer="frozen"), None)


def test_relora_merge_keeps_the_function_and_reinitialises():
    from engine.lora import apply_lora, lora_layers, merge_and_reinit, reset_optimizer_state

    m = apply_lora(_tiny(), LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    for layer in lora_layers(m):  # pretend training moved the adapters
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    x = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        before = m(input_ids=x).logits
    q = lora_layers(m)[0]
    w0, a0 = q.get_base_layer().weight.clone(), q.lora_A["default"].weight.clone()
    delta = q.get_delta_weight("default").clone()
    assert merge_and_reinit(m, seed=1) > 0
    assert torch.equal(q.get_base_layer().weight, w0 + delta)  # the merged weights carry the update
    assert not q.lora_B["default"].weight.any() and not torch.equal(q.lora_A["default"].weight, a0)
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=x).logits, before, rtol=1e-5, atol=1e-5)
    p = torch.nn.Parameter(torch.zeros(100))
    opt = torch.optim.AdamW([p])
    p.grad = torch.linspace(-1, 1, 100)
    opt.step()
    big = opt.state[p]["exp_avg"].abs() >= opt.state[p]["exp_avg"].abs().sort().values[90]
    reset_optimizer_state(opt, [p], "prune", 0.9)
    kept = opt.state[p]["exp_avg"] != 0
    assert int(kept.sum()) == 10 and torch.equal(kept, big)  # the largest 10% survive, the rest are zero
    assert int((opt.state[p]["exp_avg_sq"] != 0).sum()) == 10
    reset_optimizer_state(opt, [p], "optimizer", 0.0)
    assert not opt.state[p]["exp_avg"].any() and not opt.state[p]["exp_avg_sq"].any()


def test_row_guard_hook_decay_restore_groups_and_patterns():
    """EEVE's "new rows": the hook zeroes the old rows' gradient, decay touches the new rows only,
    restore puts the old rows back bit-for-bit; AdamW groups: matrices decay, vectors do not, guarded
    tensors are decayed by hand; `include` trains, then `exclude` freezes."""
    from engine.trainable import apply_trainable, param_groups

    m = _tiny(vocab=96)
    g = apply_trainable(m, TrainableSpec(input_embeddings="new", output_embeddings="new", transformer="frozen"), 64)
    g.snapshot()  # the trainer takes it once the weights are loaded and placed (engine/train.py)
    emb, head = m.get_input_embeddings().weight, m.get_output_embeddings().weight
    assert g.params() == [emb, head]
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["model.embed_tokens.weight", "lm_head.weight"]
    groups = param_groups(m, 0.1, g)
    assert [(len(x["params"]), x["weight_decay"]) for x in groups] == [(2, 0.0)]  # no AdamW decay on guarded rows
    m(input_ids=torch.randint(0, 96, (2, 8)), labels=torch.randint(0, 96, (2, 8))).loss.backward()
    for p in (emb, head):
        assert not p.grad[:64].any() and p.grad[64:].any()
    w0 = emb.detach().clone()
    g.decay(lr=0.5, weight_decay=0.1)
    assert torch.equal(emb[:64], w0[:64]) and torch.equal(emb[64:], w0[64:] * (1 - 0.05))
    with torch.no_grad():
        emb.add_(1.0)
    g.restore()
    assert torch.equal(emb[:64], w0[:64]) and torch.equal(emb[64:], w0[64:] * (1 - 0.05) + 1.0)

    m = _tiny(vocab=96)
    g = apply_trainable(m, TrainableSpec(input_embeddings="all", output_embeddings="none", transformer="trainable",
                                         include=["lm_head"], exclude=["layers\\.0\\.mlp", "lm_head"]), None)
    assert not g
    trains = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "lm_head.weight" not in trains and not any(".mlp." in n for n in trains)  # exclude wins over include
    assert "model.embed_tokens.weight" in trains and "model.layers.0.self_attn.q_proj.weight" in trains
    decay, no_decay = param_groups(m, 0.1, g)
    assert decay["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and no_decay["params"] and all(p.ndim == 1 for p in no_decay["params"])
    # tied: "all" on either side wins over "new" (one tensor: the union of the rows)
    m = _tiny(tied=True)
    g = apply_trainable(m, TrainableSpec(input_embeddings="new", output_embeddings="all", transformer="frozen"), 64)
    assert not g and m.get_input_embeddings().weight.requires_grad


def test_relora_phases_switch_who_learns():
    from engine.lora import apply_lora, base_weights, lora_params, set_relora_phase

    m = apply_lora(_tiny(), LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    full = base_weights(m)
    set_relora_phase(m, True, full)  # warm start: the base matrices learn, the adapters wait
    assert all(p.requires_grad for p in full) and not any(p.requires_grad for p in lora_params(m))
    set_relora_phase(m, False, full)
    assert not any(p.requires_grad for p in full) and all(p.requires_grad for p in lora_params(m))
