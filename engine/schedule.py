"""Learning-rate schedules as multipliers of the peak LR (for torch's LambdaLR)."""

from __future__ import annotations

import math

from engine.spec import ScheduleSpec


def lr_factor(spec: ScheduleSpec, step: int, total: int, warmup: int) -> float:
    """Multiplier of `spec.lr` at optimizer step `step` (0-based) of `total`."""
    floor = spec.min_lr / spec.lr
    if warmup and step < warmup:
        return (step + 1) / warmup
    if spec.name == "constant":
        return 1.0
    if spec.name == "inverse_sqrt":
        return max(floor, math.sqrt(max(warmup, 1) / (step + 1)))
    decay_start = warmup
    if spec.name == "wsd":  # warmup, stable, then linear decay over the last `decay_fraction`
        decay_start = max(warmup, int(total * (1 - spec.decay_fraction)))
        if step < decay_start:
            return 1.0
    span = max(1, total - decay_start)
    progress = min(1.0, (step - decay_start) / span)
    if spec.name == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (1 - floor) * (1 - progress)  # linear, wsd
