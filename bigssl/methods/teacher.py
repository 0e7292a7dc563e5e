"""Teachers that follow their students by an exponential moving average (MoCo's key encoder,
BYOL's target, MoCo v3's momentum encoder, DINO's teacher).

`EMATeacher` makes each teacher (a frozen copy of its student, or a module built apart and
handed in) and holds the momentum schedule, so a method states both once. The method keeps the
teacher modules as its own attributes (their names are its checkpoint's keys); the engine moves
them after every optimizer step through `Method.ema_pairs` and `Method.ema_momentum`, on
whatever local tensors its layout holds.
"""

from __future__ import annotations

import copy
from typing import TypeVar

from torch import nn

from bigssl.schedules import cosine_to

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class EMATeacher:
    """(student, teacher) pairs and the momentum m(step) the engine applies after optimizer step
    `step` (counted from 0): θ_teacher ← m·θ_teacher + (1 − m)·θ_student.

    `momentum` alone: constant. With `final`: a cosine from `momentum` to `final` over
    `total_steps`, read at step + `lead` (MoCo v3 applies at the end of step t the update the
    official code makes at the start of step t + 1: lead 1)."""

    def __init__(self, momentum: float, final: float | None = None, total_steps: int = 1, lead: int = 0) -> None:
        self.start, self.final, self.total_steps, self.lead = momentum, final, total_steps, lead
        self.pairs: list[tuple[nn.Module, nn.Module]] = []

    def copy(self, student: ModuleT) -> ModuleT:
        """A frozen deep copy of `student` that follows it: the same weights to start."""
        return self.follow(student, copy.deepcopy(student))

    def follow(self, student: nn.Module, teacher: ModuleT) -> ModuleT:
        """Make `teacher` (of the same structure, built apart) follow `student`; it is frozen here."""
        teacher.requires_grad_(False)
        self.pairs.append((student, teacher))
        return teacher

    def momentum(self, step: int) -> float:
        if self.final is None:
            return self.start
        return cosine_to(self.start, self.final, step + self.lead, self.total_steps)
