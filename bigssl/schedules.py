"""Step-indexed schedules (lr, weight decay, EMA momentum, temperatures).

Each is a pure function of the optimizer step, so a resumed run recomputes exactly the value
the uninterrupted run would have used, and every schedule can be logged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up from `start` to `peak` over `warmup_steps`, then cosine to `final`."""

    peak: float
    total_steps: int
    warmup_steps: int = 0
    final: float = 0.0
    start: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start + (self.peak - self.start) * step / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.final + 0.5 * (self.peak - self.final) * (1 + math.cos(math.pi * progress))
