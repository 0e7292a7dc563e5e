"""What a traced step tells the planner (bigssl/plan/trace.py makes it), torch-free and JSON-able:
a cached trace answers `bigssl plan` without importing torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from bigssl.distributed.collective import Collective


@dataclass
class Param:
    name: str
    shape: tuple[int, ...]
    element_size: int
    trainable: bool
    unit: int  # FSDP2 unit index (units in fully_shard order, the root last)

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass
class Trace:
    world_size: int
    local_batch: int
    params: list[Param]
    buffers: dict[str, int]  # name → bytes
    synchronised_buffers: list[str]  # buffers DDP does not broadcast (the method keeps them equal)
    groups: list[list[int]]  # optimizer groups: indices into params
    units: int  # FSDP2 units, the root included
    # Forward calls of the units in the order they ran, the root last: (unit, whether its output
    # needs a gradient, so that FSDP2 hooks a backward to it).
    unit_calls: list[tuple[int, bool]] = field(default_factory=list)
    collectives: list[Collective] = field(default_factory=list)
    flops: int = 0
    activation_bytes: int = 0
    ema: bool = False
    # Optimizer groups (indices into `groups`) whose LARS step takes trust ratios at the traced
    # step: `lars_adapt` and not frozen; empty for any other optimizer (and in traces cached
    # before this field). `lars_rule` is optim.lars_rule: lars or larc.
    lars_groups: list[int] = field(default_factory=list)
    lars_rule: str = "lars"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trace:
        fields = dict(data)
        fields["params"] = [Param(**{**p, "shape": tuple(p["shape"])}) for p in data["params"]]
        fields["collectives"] = [Collective(**c) for c in data["collectives"]]
        fields["unit_calls"] = [(int(u), bool(b)) for u, b in data["unit_calls"]]
        return cls(**fields)
