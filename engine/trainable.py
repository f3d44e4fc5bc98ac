"""Which parameters train in a stage, including EEVE's "new rows only" embeddings.

"new" rows: only rows >= old_vocab_size learn. Gradients of old rows are zeroed, and because
AdamW's decoupled weight decay would still shrink them, the old rows are restored bit-for-bit
after every optimizer step (`RowGuard.restore`). Tied embeddings are one tensor: the stricter of
the two settings' row sets is the union of what either allows.
"""

from __future__ import annotations

import re

import torch

from engine.spec import TrainableSpec


class RowGuard:
    """Keeps rows [:old] of some tensors bit-identical."""

    def __init__(self):
        self.saved: list[tuple[torch.nn.Parameter, torch.Tensor, int]] = []

    def add(self, p: torch.nn.Parameter, old: int) -> None:
        self.saved.append((p, p.detach()[:old].clone(), old))
        p.register_hook(lambda g, old=old: torch.cat([torch.zeros_like(g[:old]), g[old:]]))

    @torch.no_grad()
    def restore(self) -> None:
        for p, rows, old in self.saved:
            p[:old].copy_(rows)


def apply_trainable(model, spec: TrainableSpec, old_vocab_size: int | None) -> RowGuard:
    """Set requires_grad per the spec; returns the guard for "new"-row embeddings."""
    guard = RowGuard()
    inp = model.get_input_embeddings().weight
    out_mod = model.get_output_embeddings()
    out = out_mod.weight if out_mod is not None else None
    tied = out is not None and out is inp
    for p in model.parameters():
        p.requires_grad_(spec.transformer == "trainable")

    settings = {id(inp): [spec.input_embeddings]}
    if out is not None:
        settings.setdefault(id(out), []).append(spec.output_embeddings)
    for p in ([inp] if tied else [inp, out] if out is not None else [inp]):
        modes = settings[id(p)]
        mode = "all" if "all" in modes else "new" if "new" in modes else "none"
        p.requires_grad_(mode != "none")
        if mode == "new":
            if not old_vocab_size:
                raise ValueError("trainable: `new` embeddings need old_vocab_size (set it, or extend the vocabulary first)")
            guard.add(p, old_vocab_size)

    names = dict(model.named_parameters())
    for pat in spec.include:
        for n, p in names.items():
            if re.search(pat, n):
                p.requires_grad_(True)
    for pat in spec.exclude:
        for n, p in names.items():
            if re.search(pat, n):
                p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("this stage trains no parameter: check `trainable`")
    return guard
