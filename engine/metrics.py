"""The trainer's running measurements between two metric records: throughput and time per step
(StepTimer), and loss spikes against a window of recent losses (SpikeWatch)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Optional


@dataclass
class Lap:
    tokens_per_s: float
    step_time_s: float  # mean wall seconds per step
    data_wait_s: float  # seconds spent fetching batches
    cpu_s: float  # this process's CPU seconds
    elapsed: float  # wall seconds since the timer started


class StepTimer:
    """Wall, CPU and data-wait time since the last `lap` (the last metric record)."""

    def __init__(self, step: int, tokens: int):
        self.t_start = self.t_last = time.perf_counter()
        self.cpu_last = time.process_time()
        self.step_last, self.tokens_last, self.wait = step, tokens, 0.0

    def waited(self, seconds: float) -> None:
        """Time spent waiting for a batch."""
        self.wait += seconds

    def lap(self, step: int, tokens: int) -> Lap:
        """The measurements since the last lap, then start a new one."""
        now = time.perf_counter()
        dt = max(now - self.t_last, 1e-9)
        lap = Lap(tokens_per_s=(tokens - self.tokens_last) / dt, step_time_s=dt / max(1, step - self.step_last),
                  data_wait_s=self.wait, cpu_s=time.process_time() - self.cpu_last, elapsed=now - self.t_start)
        self.t_last, self.tokens_last, self.step_last, self.wait = now, tokens, step, 0.0
        self.cpu_last = time.process_time()
        return lap


class SpikeWatch:
    """A loss is a spike when it is at least `factor` × the mean of the `window` losses before it."""

    def __init__(self, window: int, factor: float):
        self.recent: deque = deque(maxlen=window)
        self.factor = factor

    def check(self, loss: float) -> Optional[float]:
        """Records `loss`; returns the recent mean if `loss` is a spike, else None."""
        spike = None
        if len(self.recent) == self.recent.maxlen:
            mean = sum(self.recent) / len(self.recent)
            if loss >= self.factor * mean:
                spike = mean
        self.recent.append(loss)
        return spike
