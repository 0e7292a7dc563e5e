"""Count the collectives this rank issues, whoever issues them: bigssl's comm helpers, DDP's
gradient buckets and buffer broadcasts, FSDP2's parameter gathers and gradient reduce-scatters,
DeepSpeed's ZeRO traffic, DTensor's reductions.

torch's own process-group pre-hooks see every collective at the moment it is issued, from
Python or C++ (DDP's reducer calls its process group from C++, where wrapping
torch.distributed's Python functions would miss it). The capacity planner's byte counts are
tested against these (tests/test_plan_collectives.py).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from bigssl.distributed.collective import Collective

_OPS = {"ALLREDUCE": "all_reduce", "ALLGATHER": "all_gather", "REDUCE_SCATTER": "reduce_scatter",
        "BROADCAST": "broadcast", "REDUCE": "reduce", "BARRIER": "barrier", "ALLTOALL": "all_to_all",
        "GATHER": "gather", "SCATTER": "scatter"}
_HOOK_ID = 0x5B16  # one id for bigssl's hook on every group, so it can be taken off again
IN_PLACE = ("all_reduce", "broadcast", "reduce")  # their output is their input


def hooks_available() -> bool:
    return hasattr(dist.ProcessGroup, "register_pre_hook")


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@contextlib.contextmanager
def counted() -> Iterator[list[Collective]]:
    """Every collective issued on any process group of this process while inside, in order."""
    if not hooks_available():
        raise RuntimeError("counting collectives needs torch's ProcessGroup.register_pre_hook (torch >= 2.10)")
    calls: list[Collective] = []
    world = dist.group.WORLD

    def make_hook(group: dist.ProcessGroup):
        label = "world" if group == world else "other"

        def hook(args) -> None:
            op = _OPS.get(str(args.name).rsplit(".", 1)[-1], str(args.name))
            size = _bytes(args.input_tensors)
            out = size if op in IN_PLACE else _bytes(args.output_tensors)
            calls.append(Collective(op, size, out, label))

        return hook

    groups = list(distributed_c10d._world.pg_map)
    for group in groups:
        group.register_pre_hook(_HOOK_ID, make_hook(group))
    try:
        yield calls
    finally:
        for group in groups:
            group.unregister_pre_hook(_HOOK_ID)


def totals(calls: Iterable[Collective]) -> dict[str, dict[str, int]]:
    """Per operation: calls, input bytes and output bytes, summed (barriers carry no bytes)."""
    out: dict[str, Counter] = {}
    for call in calls:
        if call.op == "barrier":
            continue
        entry = out.setdefault(call.op, Counter())
        entry["calls"] += 1
        entry["in_bytes"] += call.in_bytes
        entry["out_bytes"] += call.out_bytes
    return {op: dict(entry) for op, entry in sorted(out.items())}
