"""Where this process sits in the job: rank, world size, local rank and rendezvous address.

Launchers only set environment variables; this module reads them. Precedence: the torchrun
convention (RANK/WORLD_SIZE, also set by the deepspeed launcher and `accelerate launch`), then
SLURM's srun variables, then a single process.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bigssl.distributed import comm, watchdog
from bigssl.errors import UserError


class RankLost(RuntimeError):
    """Another rank of the job exited or stopped responding."""


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


def init(env: DistEnv, backend: str = "auto", timeout_s: float = 1800.0, dead_rank_timeout_s: float = 0.0) -> str:
    """Join the process group described by `env`; returns the backend in use ('' if single).
    `dead_rank_timeout_s` > 0 starts the heartbeat watchdog (see watchdog.py)."""
    if not env.distributed or dist.is_initialized():
        return dist.get_backend() if dist.is_initialized() else ""
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    timeout = datetime.timedelta(seconds=timeout_s)
    # The rendezvous store made here (a client of the launcher's store under torchrun) is kept
    # for the watchdog's heartbeats.
    url = f"tcp://{env.master_addr}:{env.master_port}?rank={env.rank}&world_size={env.world_size}"
    store, _, _ = next(dist.rendezvous(url, timeout=timeout))
    dist.init_process_group(backend=backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
    if dist.get_world_size() != env.world_size:
        raise RuntimeError(f"process group has {dist.get_world_size()} ranks, expected {env.world_size}")
    # Counters, flags and positions are small CPU objects: under NCCL they go through gloo.
    comm.set_cpu_group(dist.new_group(backend="gloo") if backend == "nccl" else None)
    if dead_rank_timeout_s > 0:
        interval = max(0.2, min(5.0, dead_rank_timeout_s / 10))
        watchdog.start(store, env.rank, env.world_size, interval, dead_rank_timeout_s)
    return backend


_alone = False  # a one-rank group started by init_alone


def init_alone(backend: str) -> None:
    """A process group of this process alone, on `backend`, so that a check on one machine runs
    the collectives' real code path (tools/gpu_check.py: NCCL on one GPU, gloo on a CPU): the DDP
    engine then wraps the method as it does for many ranks. Runs never start one."""
    global _alone
    if dist.is_initialized():
        raise RuntimeError("init_alone: a process group is already up")
    if backend == "nccl":
        torch.cuda.set_device(0)
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    _alone = True


def alone_in_group() -> bool:
    return _alone and dist.is_initialized()


def lost_ranks(error: BaseException) -> str | None:
    """After `error` in a distributed run: which ranks went silent, if any (a failed collective
    names no rank). Waits a few heartbeats; None for errors that are the user's or the run's own."""
    if isinstance(error, (UserError, KeyboardInterrupt)) or not dist.is_initialized():
        return None
    return watchdog.diagnose()


def shutdown(clean: bool = True) -> None:
    """Leave the process group; `clean=False` skips the barrier (another rank may be gone)."""
    global _alone
    watchdog.stop(finished=clean)
    _alone = False
    if dist.is_initialized():
        if clean:
            dist.barrier()
        comm.set_cpu_group(None)
        dist.destroy_process_group()


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def describe(env: DistEnv, backend: str) -> str:
    return (f"rank {env.rank} of {env.world_size} (local {env.local_rank}) on {socket.gethostname()}, "
            f"launcher {env.launcher}, backend {backend or 'none'}")
