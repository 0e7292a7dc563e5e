"""One collective as a rank issues it: what bigssl/distributed/counting.py counts, what
comm.simulated records, what the capacity planner predicts. Torch-free, so the planner can
read cached predictions without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Collective:
    """The bytes of its input and output tensors on this rank (an all-reduce or broadcast works
    in place: its output counts as its input), and who called it."""

    op: str  # all_reduce | all_gather | reduce_scatter | broadcast
    in_bytes: int
    out_bytes: int
    group: str = "world"  # world | cpu (the gloo side group under NCCL) | other
    purpose: str = ""
