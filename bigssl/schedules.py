"""Step-indexed schedules (lr, weight decay, EMA momentum, temperatures).

Each is a pure function of the optimizer step, so a resumed run recomputes exactly the value
the uninterrupted run would have used, and every schedule can be logged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


def warmup_value(start: float, peak: float, step: int, warmup_steps: int, includes_peak: bool) -> float:
    """Linear from `start` at step 0: reaching `peak` at step `warmup_steps` (the first step
    after the warm-up), or with `includes_peak` at its last step, `warmup_steps − 1`, which is
    what np.linspace(start, peak, warmup_steps) gives (the official DINO and SwAV schedules)."""
    span = max(1, warmup_steps - 1) if includes_peak else warmup_steps
    return start + (peak - start) * step / span


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up from `start` to `peak` over `warmup_steps`, then cosine to `final` (the
    cosine's own step counts from the end of the warm-up, as in the official codes)."""

    peak: float
    total_steps: int
    warmup_steps: int = 0
    final: float = 0.0
    start: float = 0.0
    warmup_includes_peak: bool = False

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return warmup_value(self.start, self.peak, step, self.warmup_steps, self.warmup_includes_peak)
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.final + 0.5 * (self.peak - self.final) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class WarmupSteps:
    """Linear warm-up from `start` to `peak` over `warmup_steps`, then `peak × factors[i]` from
    `milestones[i]` on (MoCo v1, InstDisc, CMC: ×0.1 at epochs 120 and 160)."""

    peak: float
    milestones: tuple[int, ...]
    factors: tuple[float, ...]
    warmup_steps: int = 0
    start: float = 0.0
    warmup_includes_peak: bool = False

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return warmup_value(self.start, self.peak, step, self.warmup_steps, self.warmup_includes_peak)
        passed = sum(step >= m for m in self.milestones)
        return self.peak * (self.factors[passed - 1] if passed else 1.0)


def cosine_to(start: float, end: float, step: int, total_steps: int) -> float:
    """Half-cosine from `start` at step 0 to `end` at `total_steps` (EMA momentum 0.996 → 1,
    DINO's weight decay 0.04 → 0.4)."""
    progress = min(1.0, step / max(1, total_steps))
    return end - (end - start) * 0.5 * (1 + math.cos(math.pi * progress))


def linear_warmup(start: float, end: float, step: int, warmup_steps: int) -> float:
    """Linear from `start` to `end` over `warmup_steps`, then `end` (DINO's teacher temperature)."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


@dataclass(frozen=True)
class PerEpoch:
    """`schedule` held at its value for each epoch's first step: the lr of MoCo v2 and SimSiam,
    which their official loops set once per epoch (a cosine in the epoch index)."""

    schedule: Callable[[int], float]
    steps_per_epoch: int

    def __call__(self, step: int) -> float:
        return self.schedule(step - step % self.steps_per_epoch)
