"""Where this process sits in the job, from the variables its launcher set: rank, world size,
local rank and rendezvous address.

Launchers only set environment variables; this module reads them. Precedence: the torchrun
convention (RANK/WORLD_SIZE, also set by the deepspeed launcher and `accelerate launch`), then
SLURM's srun variables, then a single process. Torch-free, so that the CLI knows the rank (to
report a config error once) and the world size (to check the batch split) before torch loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
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


def first_host(nodelist: str) -> str:
    """First hostname of a SLURM nodelist such as 'gpu[003-005,010],cpu1' (→ 'gpu003')."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise UserError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


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
            master_addr=env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
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
