"""Peak-RSS increase of one forward + backward of a Llama on CPU (fp32, SDPA), in a fresh process
(launched by test_memory_model.py and bench/train.py with a JSON job). Gradients exist beforehand (as in
any step after the first with accumulation), so the increase is the activations + the loss buffer.
Prints {"increase": bytes} as its last line.

The peak is the kernel's VmHWM, reset just before the step (`5` to /proc/self/clear_refs), not
ru_maxrss: Linux carries ru_maxrss over execve, so a child of a large pytest process starts with its
parent's RSS as its "peak" and the increase would depend on what the suite had loaded before."""

from __future__ import annotations

import json
import sys


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)


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
    reset_peak()
    base = status_kb("VmRSS")
    if head is None:
        loss = model(input_ids=x, labels=x, use_cache=False).loss
    else:
        loss = linear_cross_entropy(model(input_ids=x, use_cache=False).logits, head.weight, shifted_targets(x))
    loss.backward()
    peak = status_kb("VmHWM")
    print(json.dumps({"increase": peak - base, "base": base, "peak": peak}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
