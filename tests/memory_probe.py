"""Per-rank model-state bytes of a tiny Llama under DeepSpeed ZeRO-2/3 (launched by test_memory_model.py as
`torchrun --nproc_per_node 2 tests/memory_probe.py OUT.json STAGE`, DS_ACCELERATOR=cpu).

After one optimizer step each rank writes what DeepSpeed really holds: the model's parameter storage
(ZeRO-3: the `ds_tensor` partitions), the fp32 master partitions, their gradients and Adam moments."""

from __future__ import annotations

import json
import sys


def main(out: str, stage: int) -> None:
    import faulthandler

    faulthandler.dump_traceback_later(300, exit=True)
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # no JIT build of the shared-memory all-reduce (minutes, and not needed)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds_cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "bf16": {"enabled": False}}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    x = torch.randint(0, 1000, (1, 16))
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)

    def nbytes(t):
        return t.numel() * t.element_size()

    # the gradient partitions as they stand between backward and step (the step frees them)
    if stage == 3:
        grads = nbytes(optimizer.grad_partitions_flat_buffer)
    else:
        grads = sum(nbytes(g) for gs in optimizer.averaged_gradients.values() if gs is not None
                    for g in (gs if isinstance(gs, list) else [gs]))
    engine.step()

    rec = {"rank": rank, "world": world, "grads": grads}
    if stage == 3:
        rec["params"] = sum(nbytes(p.ds_tensor) for p in model.parameters())
        masters = optimizer.fp32_partitioned_groups_flat
    else:
        rec["params"] = sum(nbytes(p) for p in model.parameters())
        masters = optimizer.single_partition_of_fp32_groups
    rec["master"] = sum(nbytes(m) for m in masters)
    inner = optimizer.optimizer
    rec["moments"] = sum(nbytes(v) for st in inner.state.values() for k, v in st.items()
                         if k in ("exp_avg", "exp_avg_sq"))
    rec["total_params"] = sum(p.ds_numel if stage == 3 else p.numel() for p in model.parameters())
    with open(f"{out}.{rank}", "w") as f:
        json.dump(rec, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
