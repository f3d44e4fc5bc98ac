"""Learning-rate schedules: the LR is a pure function of the optimizer step.

No scheduler object carries hidden state: a checkpoint only needs the step and the step at which
the schedule started (`start`, moved by a resume with `load_lr_scheduler: false`), so resuming
at step 10 000 costs nothing and the curve continues exactly. ReLoRA's jagged schedule multiplies
the base schedule by a linear re-warmup after every restart (merge).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Union

from engine.spec import ScheduleSpec, StageSpec


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


def warmup_steps(spec: Union[ScheduleSpec, StageSpec], total: int) -> int:
    """Warmup steps of a schedule (or a stage's schedule) over `total` steps: the one definition
    (the plan shows it, the trainer's Schedule uses it)."""
    spec = spec.schedule if isinstance(spec, StageSpec) else spec
    if spec.warmup_steps is not None:
        return spec.warmup_steps
    if spec.warmup_ratio is not None:
        return math.ceil(spec.warmup_ratio * total)
    return 0


@dataclass
class Schedule:
    """The LR of a stage: `spec` over steps [start, total), with optional re-warmups at `restarts`."""

    spec: ScheduleSpec
    total: int
    start: int = 0
    restarts: list[int] = field(default_factory=list)  # sorted steps after which the LR re-warms
    rewarmup: int = 0

    @property
    def warmup(self) -> int:
        return warmup_steps(self.spec, self.total - self.start)

    def lr(self, step: int) -> float:
        """The LR of the optimizer step with 0-based index `step`."""
        s = max(0, step - self.start)
        f = lr_factor(self.spec, s, self.total - self.start, self.warmup)
        i = bisect.bisect_right(self.restarts, step) - 1
        if i >= 0 and self.rewarmup:
            f *= min(1.0, (step - self.restarts[i] + 1) / self.rewarmup)
        return self.spec.lr * f
