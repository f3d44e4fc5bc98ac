"""Peak-RSS increase of one forward + backward of a Llama on CPU (fp32, SDPA), in a fresh process
(launched by test_memory_model.py and bench/train.py with a JSON job). Gradients exist beforehand (as in
any step after the first with accumulation), so the increase is the activations + the loss buffer.
Prints {"increase": bytes} as its last line."""

from __future__ import annotations

import json
import resource
import sys


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main(job: dict) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.loss import install_head, linear_cross_entropy, shifted_targets

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**job["arch"], max_position_embeddings=max(job["seq"], 64)))
    model.config._attn_implementation = "sdpa"
    if job["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    head = install_head(model) if job["fused"] else None
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    x = torch.randint(0, job["arch"]["vocab_size"], (job["micro"], job["seq"]))
    base = max(rss_now(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if head is None:
        loss = model(input_ids=x, labels=x, use_cache=False).loss
    else:
        loss = linear_cross_entropy(model(input_ids=x, use_cache=False).logits, head.weight, shifted_targets(x))
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"increase": peak - base, "base": base, "peak": peak}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
