"""The causal-LM loss without materialising the logits of the whole batch.

Hugging Face's `model(input_ids, labels=...)` builds logits of shape (batch, seq, vocab), upcasts
them to fp32, runs log_softmax, then nll_loss, and the backward makes two more tensors of that
size. For Llama 3's 128k vocabulary at 8k tokens that is 4 GB per sequence; on a CPU it is also
the slowest part of a small model's step. Here the head runs chunk by chunk: each chunk's logits
are computed, turned into the loss and its gradient (softmax - one-hot) at once, and dropped, so
only (tokens, hidden) and (vocab, hidden) gradients are kept. The result equals the standard loss
(same mean over predicted positions) up to float rounding; it is deterministic, so resumes stay
bit-exact.

Used when the output head is a plain bias-free `nn.Linear` of a model family without logit
scaling or soft-capping, and the weights are not partitioned (ZeRO-3): otherwise the trainer keeps
the standard loss. During training the head module is swapped for `HiddenHead`, which returns the
hidden states; it holds the same Parameter under the same name, so state dicts, tying, optimizer
groups and gradient hooks are unchanged. `restore_head` puts the original Linear back for export.
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE = -100
# Families whose logits are exactly lm_head(final hidden state): no soft-capping, no scale.
PLAIN_HEAD_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "phi3", "smollm3"}


class HiddenHead(nn.Module):
    """Stands in for `lm_head`: returns its input. `weight` is the head's own Parameter."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight
        self._linear = [linear]  # not a submodule: the state dict keeps one `weight`

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    @property
    def linear(self) -> nn.Linear:
        return self._linear[0]


def _inner(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fused_head_unsupported(model, zero3: bool) -> str | None:
    """Why the fused loss cannot be used for `model`, or None."""
    inner = _inner(model)
    head = inner.get_output_embeddings()
    family = getattr(inner.config, "model_type", "")
    if zero3:
        return "ZeRO-3 partitions the head's weight"
    if type(head) is not nn.Linear:
        return f"the output head is a {type(head).__name__} (LoRA or modules_to_save on lm_head?)"
    if head.bias is not None:
        return "the output head has a bias"
    if family not in PLAIN_HEAD_FAMILIES:
        return f"model family {family!r} is not known to have a plain linear head"
    return None


def install_head(model) -> HiddenHead:
    inner = _inner(model)
    head = HiddenHead(inner.get_output_embeddings())
    inner.set_output_embeddings(head)
    return head


def restore_head(model) -> None:
    inner = _inner(model)
    head = inner.get_output_embeddings()
    if isinstance(head, HiddenHead):
        inner.set_output_embeddings(head.linear)


def shifted_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1; the last position predicts nothing."""
    return nn.functional.pad(input_ids[:, 1:], (0, 1), value=IGNORE)


def chunk_tokens(vocab: int, device: torch.device) -> int:
    """Tokens per chunk: ~2 MB of fp32 logits on a CPU (stays in cache), ~128 MB on a GPU."""
    elements = 2**25 if device.type == "cuda" else 2**19
    return max(16, elements // vocab)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """mean over non-ignored positions of cross_entropy(hidden @ weight.T, targets), chunked."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    chunk = chunk or chunk_tokens(weight.shape[0], h.device)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, t, chunk)
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        total += _chunk(h[s:s + chunk], weight, t[s:s + chunk], want_grad=False)[0]
    return total / (t != IGNORE).sum().clamp_min(1)


def _chunk(h, w, t, want_grad: bool):
    """(loss sum, d loss_sum / d logits or None) for one chunk. One logits buffer, worked in place."""
    logits = (h @ w.t()).float()
    keep = t != IGNORE
    tc = t.clamp_min(0)
    target = logits.gather(1, tc[:, None]).squeeze(1)
    mx = logits.amax(1, keepdim=True)
    sumexp = logits.sub_(mx).exp_().sum(1, keepdim=True)
    loss = (((sumexp.log() + mx).squeeze(1) - target) * keep).sum()
    if not want_grad:
        return loss, None
    g = logits.div_(sumexp)  # softmax
    g[torch.arange(len(tc), device=g.device), tc] -= 1
    if g.device.type != "cpu":
        g.mul_(keep[:, None])  # ignored positions: no gradient (no host sync on an accelerator)
    elif not keep.all():
        g[~keep] = 0  # on CPU: only the few ignored rows, not a pass over the whole chunk
    return loss, g


class _LinearCrossEntropy(torch.autograd.Function):
    """Computes the gradients during the forward (the loss is a scalar), scales them in backward."""

    @staticmethod
    def forward(ctx, h, w, t, chunk):
        need_h, need_w = h.requires_grad, w.requires_grad
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        total = h.new_zeros((), dtype=torch.float32)
        dev = h.device.type
        autocast = torch.is_autocast_enabled(dev)  # then the matmuls cast by themselves
        fp32 = not autocast and h.dtype == w.dtype == torch.float32  # g is fp32 too: no temporaries
        # fp16 anywhere: the weight gradient g.T @ h sums |g| <= 1 times the hidden values over a
        # whole chunk of tokens, unscaled (the loss scale comes in backward): in fp16 that passes
        # 65504 where the standard loss's (already 1/N-scaled) gradient does not. Done in fp32.
        # (g @ w stays in the low precision: |g| sums to <= 2 per row, it cannot overflow.)
        half = torch.float16 in (h.dtype, w.dtype) or (autocast and torch.get_autocast_dtype(dev) == torch.float16)
        for s in range(0, h.shape[0], chunk):
            hc = h[s:s + chunk]
            loss, g32 = _chunk(hc, w, t[s:s + chunk], want_grad=True)
            total += loss
            g = g32 if autocast else g32.to(w.dtype)  # no copy in fp32
            if need_h:
                if fp32:
                    torch.mm(g, w, out=gh[s:s + chunk])
                else:
                    gh[s:s + chunk] = g @ w
            if need_w:
                if fp32:
                    gw.addmm_(g.t(), hc)
                elif half:
                    with torch.autocast(dev, enabled=False):
                        gw.addmm_(g32.t(), hc.float())
                else:
                    gw += (g.t() @ hc.to(g.dtype)).float()
        count = (t != IGNORE).sum().clamp_min(1)
        ctx.save_for_backward(gh, gw, count)
        ctx.dtypes = (h.dtype, w.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw, count = ctx.saved_tensors
        scale = grad_out / count
        return (None if gh is None else (gh * scale).to(ctx.dtypes[0]),
                None if gw is None else (gw * scale).to(ctx.dtypes[1]), None, None)
