"""Which parameters train in a stage, including EEVE's "new rows only" embeddings.

"new" rows: only rows >= old_vocab_size learn. A gradient hook zeroes the old rows' gradients, so
AdamW's update of those rows is exactly zero. AdamW's decoupled weight decay would still shrink
them, so guarded tensors sit in a weight-decay-free parameter group and `RowGuard.decay` applies
the decay to the new rows only (the same `p *= 1 - lr·wd` AdamW does, before its update).
`RowGuard.restore` then copies the old rows back bit-for-bit (a no-op unless an optimizer state
loaded from an all-rows stage still carries momentum for them).

Tied embeddings are one tensor: it trains the union of the rows either setting allows.

The saved rows are taken by `snapshot()` once the weights are loaded (a restart's checkpoint, or
`start: resume`) and the model is placed: they live on the parameter's device, so no host↔device
copy happens per step. Under ZeRO-3 (parameters partitioned by
deepspeed.zero.Init: `p.shape` is an empty placeholder, `p.ds_shape` the real shape) shapes come
from `ds_shape`; the guard keeps only the gradient hook (old rows' gradients are zero, they sit in
the no-decay group, so AdamW leaves them unchanged) and saves no copy; DeepSpeed runs the optimizer
step, so `decay`/`restore` are not called there (the new rows get no weight decay under DeepSpeed).
"""

from __future__ import annotations

import re

import torch

from engine.spec import TrainableSpec


def real_shape(p: torch.Tensor) -> torch.Size:
    """The parameter's shape, also when ZeRO-3 partitioned it (`ds_shape`)."""
    return getattr(p, "ds_shape", None) or p.shape


def partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_shape") and hasattr(p, "ds_id")


class RowGuard:
    """Keeps rows [:old] of some tensors bit-identical."""

    def __init__(self):
        self.saved: list[tuple[torch.nn.Parameter, torch.Tensor, int]] = []

    def __bool__(self) -> bool:
        return bool(self.saved)

    def add(self, p: torch.nn.Parameter, old: int) -> None:
        rows = real_shape(p)[0]
        if old >= rows:
            raise ValueError(f"old_vocab_size {old} leaves no new row in a tensor of {rows} rows")
        self.saved.append((p, None, old))  # rows: `snapshot()`, once the weights are loaded and placed
        p.register_hook(lambda g, old=old: torch.cat([torch.zeros_like(g[:old]), g[old:]]))

    def params(self) -> list[torch.nn.Parameter]:
        return [p for p, _, _ in self.saved]

    @torch.no_grad()
    def decay(self, lr: float, weight_decay: float) -> None:
        for p, _, old in self.saved:
            if weight_decay:
                p[old:].mul_(1 - lr * weight_decay)

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy the protected rows as they are now (after loading weights and placing the model:
        on the parameter's own device, so that `restore` never copies between host and device)."""
        self.saved = [(p, None if partitioned(p) else p.detach()[:old].clone(), old) for p, _, old in self.saved]

    @torch.no_grad()
    def restore(self) -> None:
        for p, rows, old in self.saved:
            if rows is not None:
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
    for p in ([inp] if tied or out is None else [inp, out]):
        modes = settings[id(p)]
        mode = "all" if "all" in modes else "new" if "new" in modes else "none"
        p.requires_grad_(mode != "none")
        if mode == "new":
            if not old_vocab_size:
                raise ValueError("trainable: `new` embeddings need old_vocab_size (set it, or extend the vocabulary first)")
            guard.add(p, old_vocab_size)

    apply_patterns(model, spec.include, spec.exclude)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("this stage trains no parameter: check `trainable`")
    return guard


def apply_patterns(model, include: list[str], exclude: list[str]) -> None:
    """Named-parameter regexes: `include` trains, then `exclude` freezes."""
    names = dict(model.named_parameters())
    for pats, flag in ((include, True), (exclude, False)):
        for pat in pats:
            for n, p in names.items():
                if re.search(pat, n):
                    p.requires_grad_(flag)


def param_groups(model, weight_decay: float, guard: RowGuard) -> list[dict]:
    """AdamW groups: matrices decay, vectors (norms, biases) do not, guarded tensors decay by hand.
    The dimension is the real one under ZeRO-3 (`ds_shape`), not the partition's placeholder."""
    guarded = {id(p) for p in guard.params()}
    decay, no_decay, rows = [], [], []
    seen = set()
    for _, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (rows if id(p) in guarded else decay if len(real_shape(p)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if rows:
        groups.append({"params": rows, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]
