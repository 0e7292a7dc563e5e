"""Joining and leaving the job's process group, and which device this rank uses.

Where the process sits in the job (rank, world size, rendezvous address) is read from the
launcher's variables by `bigssl.distributed.launch`, which needs no torch; its names are
re-exported here.
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist

from bigssl.distributed import comm, watchdog
from bigssl.distributed.launch import DistEnv, detect, first_host, hostnames
from bigssl.errors import RankLost, UserError

__all__ = ["DistEnv", "RankLost", "describe", "detect", "device_for", "first_host", "hostnames", "init", "lost_ranks",
           "shutdown"]


_joined = False  # whether init() made the current process group (shutdown leaves only that one)


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
    global _joined
    _joined = True
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
    global _alone, _joined
    if dist.is_initialized():
        raise RuntimeError("init_alone: a process group is already up")
    if backend == "nccl":
        torch.cuda.set_device(0)
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    _alone = _joined = True


def alone_in_group() -> bool:
    return _alone and dist.is_initialized()


def lost_ranks(error: BaseException) -> str | None:
    """After `error` in a distributed run: which ranks went silent, if any (a failed collective
    names no rank). Waits a few heartbeats; None for errors that are the user's or the run's own."""
    if isinstance(error, (UserError, KeyboardInterrupt)) or not dist.is_initialized():
        return None
    return watchdog.diagnose()


def shutdown(clean: bool = True) -> None:
    """Leave the process group `init` (or `init_alone`) joined; `clean=False` skips the barrier
    (another rank may be gone). A group someone else made (an engine's private one-rank group, a
    caller's) is left alone: libraries that cached it (DeepSpeed does) would otherwise hold a
    destroyed group."""
    global _joined, _alone
    watchdog.stop(finished=clean)
    _alone = False
    if dist.is_initialized() and _joined:
        if clean:
            dist.barrier()
        comm.set_cpu_group(None)
        dist.destroy_process_group()
    _joined = False


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def describe(env: DistEnv, backend: str) -> str:
    return (f"rank {env.rank} of {env.world_size} (local {env.local_rank}) on {socket.gethostname()}, "
            f"launcher {env.launcher}, backend {backend or 'none'}")
