"""Fault injection, used only by the tests: environment variables, read once, that never change a
run without them (each hook then returns at once).

    CPT_FAULT_NAN_STEP="3,7"     the loss of those (1-based) steps is NaN
    CPT_FAULT_KILL_STEP=k        every rank SIGKILLs itself in the middle of step k (after the first
                                 micro-batch's forward): a hard crash, for the resume tests
    CPT_FAULT_SLOW_S=t           t seconds added to every step (time to deliver a signal), spread over
                                 its micro-batches (t/n before each of n): a long accumulation step
    CPT_FAULT_SLOW_STEPS="2,3"   only those (1-based) steps are slowed (default: every step)
    CPT_FAULT_PREP_KILL_AFTER=n  data preparation SIGKILLs itself once a source has committed n
                                 train tokens (engine/data/pack.py)
"""

from __future__ import annotations

import os
import signal
import time
from typing import Mapping, Optional


def _steps(env: Mapping[str, str], name: str) -> set[int]:
    return {int(x) for x in env.get(name, "").split(",") if x.strip()}


def prep_kill_after(env: Optional[Mapping[str, str]] = None) -> Optional[int]:
    env = os.environ if env is None else env
    return int(env["CPT_FAULT_PREP_KILL_AFTER"]) if env.get("CPT_FAULT_PREP_KILL_AFTER") else None


class Faults:
    """The trainer's faults. Hooks: `step_begins` at the start of a step, `micro_begins` before each
    micro-batch, `loss` on each micro-batch's loss (returns the loss to use)."""

    def __init__(self, env: Optional[Mapping[str, str]] = None):
        env = os.environ if env is None else env
        self.nan_steps = _steps(env, "CPT_FAULT_NAN_STEP")
        self.kill_steps = _steps(env, "CPT_FAULT_KILL_STEP")
        self.slow = float(env.get("CPT_FAULT_SLOW_S", "0"))
        self.slow_steps = _steps(env, "CPT_FAULT_SLOW_STEPS")

    def step_begins(self, step: int) -> None:
        """`step`: 1-based, the step about to run."""

    def micro_begins(self, step: int, micro: int, n: int) -> None:
        """Before micro-batch `micro` (0-based) of the `n` of 1-based `step`."""
        if self.slow and (not self.slow_steps or step in self.slow_steps):
            time.sleep(self.slow / n)

    def loss(self, loss, step: int, micro: int):
        """`step`: 1-based; `micro`: the micro-batch's index within the step."""
        if step in self.kill_steps and micro == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # a hard crash in the middle of a step
        if step in self.nan_steps:
            return loss * float("nan")
        return loss
