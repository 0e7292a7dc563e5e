"""Where this process sits in the job, from the variables its launcher set: rank, world size,
local rank and rendezvous address.

Launchers only set environment variables; this module reads them. Precedence: the torchrun
convention (RANK/WORLD_SIZE, also set by the deepspeed launcher and `accelerate launch`), then
SLURM's srun variables, then a single process. Torch-free, so that the CLI knows the rank (to
report a config error once) and the world size (to check the batch split) before torch loads.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

from bigssl.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def hostnames(nodelist: str) -> list[str]:
    """Every host of a SLURM hostlist, in order, as `scontrol show hostnames` lists them:
    'gpu[01-02,07],cpu1' → gpu01, gpu02, gpu07, cpu1 (zero padding kept; several bracket groups
    in one name, as 'a[1-2]b[3-4]', expand as their product)."""
    return [host for item in _split_top_level(nodelist) for host in _expand(item, nodelist)]


def first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist ('gpu[003-005,010],cpu1' → 'gpu003'): where srun's task 0
    runs (measured on a 3-node SLURM: the list is sorted, and tasks are placed in its order)."""
    for item in _split_top_level(nodelist):
        for host in _expand(item, nodelist):
            return host
    raise UserError(f"cannot parse the SLURM node list {nodelist!r}: it names no host")


def _split_top_level(nodelist: str) -> list[str]:
    """The comma-separated items of a hostlist; commas inside brackets separate ranges instead."""
    items, depth, start = [], 0, 0
    for index, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise UserError(f"cannot parse the SLURM node list {nodelist!r}: unbalanced brackets")
        if char == "," and depth == 0:
            items.append(nodelist[start:index])
            start = index + 1
    if depth:
        raise UserError(f"cannot parse the SLURM node list {nodelist!r}: unbalanced brackets")
    items.append(nodelist[start:])
    return [item.strip() for item in items if item.strip()]


def _expand(item: str, nodelist: str) -> Iterator[str]:
    """Hosts of one item, one at a time (first_host stops at the first)."""
    parts = [part for part in re.split(r"(\[[^\]]*\])", item) if part]
    choices: list[list[str]] = []
    for part in parts:
        if part.startswith("["):
            choices.append(_range_values(part[1:-1], nodelist))
        elif "[" in part or "]" in part:
            raise UserError(f"cannot parse the SLURM node list {nodelist!r}")
        else:
            choices.append([part])
    for combination in itertools.product(*choices):
        yield "".join(combination)


def _range_values(ranges: str, nodelist: str) -> list[str]:
    """'01-03,7' → 01, 02, 03, 7: a range keeps the width of its lower bound, as SLURM pads."""
    values = []
    for piece in ranges.split(","):
        low, _, high = piece.strip().partition("-")
        if not low.isdigit() or not (high or low).isdigit() or int(high or low) < int(low):
            raise UserError(f"cannot parse the SLURM node list {nodelist!r}: bad range {piece!r}")
        values += [str(n).zfill(len(low)) for n in range(int(low), int(high or low) + 1)]
    return values


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError as err:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from err


def detect() -> DistEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=_int_env("RANK"),
            world_size=_int_env("WORLD_SIZE"),
            local_rank=_int_env("LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int_env("MASTER_PORT") if "MASTER_PORT" in env else 29500,
            launcher="torchrun",
        )
    # srun exports SLURM_STEP_NUM_TASKS for the step; SLURM_NTASKS alone is also visible in
    # the batch script itself, where only one process runs.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        return DistEnv(
            rank=_int_env("SLURM_PROCID"),
            world_size=_int_env("SLURM_STEP_NUM_TASKS"),
            local_rank=_int_env("SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            # Task 0 runs on the first node of the step, which is not the job's first node when
            # srun uses part of the allocation (--relative, --nodelist).
            master_addr=env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST")
                                                             or env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            # A port derived from the job id keeps two jobs on one node apart.
            master_port=int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
            launcher="slurm",
        )
    return DistEnv()


def record_failure(line: str) -> None:
    """Under torchrun: leave this rank's one-line error where torchrun's failure report reads it
    (the error file of its `@record` protocol), so the report shows bigssl's line instead of "To
    enable traceback see: ...". Nothing under other launchers; never raises."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    with contextlib.suppress(OSError), open(path, "w") as handle:
        json.dump(data, handle)
