"""Shared test utilities: free ports, 2-process gloo runs, 2 ranks as threads of one process, the CLI
as a subprocess, small and full disks."""

from __future__ import annotations

import contextlib
import errno
import math
import multiprocessing
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart" / "simclr.yaml"
# A few small steps of the real recipe: narrower network, small batch.
SMALL = ["model.backbone_args.channels=[8,16,32,64]", "model.projector.hidden_dim=32",
         "model.projector.out_dim=16", "optim.batch_size=32", "data.workers=1", "log.every_steps=1"]


def fair_warmup_cosine(step: int, base: float, warmup_steps: int, max_steps: int) -> float:
    """The lr of `adjust_learning_rate` in the Barlow Twins and VICReg repositories
    (facebookresearch), written out: linear from 0 over the warm-up, then a cosine from `base` to
    0.001 × `base`."""
    if step < warmup_steps:
        return base * step / warmup_steps
    q = 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (max_steps - warmup_steps)))
    return base * q + base * 0.001 * (1 - q)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


# Warnings raised in bigssl's modules, or by a deprecated API that bigssl calls (attributed to the
# caller), fail the test: in this process through pyproject.toml's filterwarnings, in the gloo
# workers through this filter. Third-party warnings about third-party code are left alone.
OWN_WARNINGS = r"bigssl(\.|$)"


def worker_env() -> dict[str, str]:
    """This environment minus any rank variables: in-process engine tests set them (DeepSpeed
    reads the rank from the environment), and a launched job must see only its launcher's.
    One thread per launched process (torchrun's default too): the CLI tests compare reruns of
    one layout bit for bit, or accuracies (counts), so the thread count hides no rounding there."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update({"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


def _entry(rank: int, fn: Callable, world_size: int, port: int, threads: int, environ: dict[str, str],
           bigssl_file: str, args: tuple) -> None:
    import bigssl

    if bigssl.__file__ != bigssl_file:  # the fork server's sys.path starts at its working directory
        raise RuntimeError(f"the ranks' fork server imported {bigssl.__file__}, the test process {bigssl_file}: "
                           "run `python -m pytest` from the checkout it tests, or set PYTHONPATH to it")
    os.environ.clear()  # the caller's environment now, as a spawned process would have it
    os.environ.update(environ)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    # This platform's default start method, as in a rank that torchrun starts (a forked server's
    # child would otherwise start its DataLoader workers the server's way): fork on Linux.
    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
    torch.set_num_threads(threads)  # OMP_NUM_THREADS set here would come too late: read at `import torch`
    warnings.filterwarnings("error", module=OWN_WARNINGS)
    from bigssl.distributed import comm, env

    dist_env = env.DistEnv(rank=rank, world_size=world_size, local_rank=rank, master_addr="127.0.0.1",
                           master_port=port, launcher="test")
    env.init(dist_env, backend="gloo", timeout_s=120)
    # Launchers can fail silently into one process: check the group really has them all.
    assert comm.world_size() == world_size, f"rank {rank} sees world size {comm.world_size()}"
    fn(rank, world_size, *args)
    env.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # torch 2.14 + gloo can abort in its exit handlers (about 1 run in 5)


# The modules every rank imports, imported once into multiprocessing's fork server: a rank is a
# fork of that server, ready in a tenth of a second instead of importing torch and bigssl again
# (3 s of CPU a rank, most of what a small 2-rank test costs). The server is a fresh interpreter
# of its own, started on first use and running no tensor op, so a rank inherits nothing of this
# process (process groups, seeds, registries filled by tests, threads), as a spawned one does;
# _entry gives it this process's environment as it is at the call.
RANK_PRELOAD = ["torch", "torch.distributed.fsdp", "timm", "bigssl.train", "bigssl.eval.offline"]


def _rank_server() -> None:
    multiprocessing.get_context("forkserver").set_forkserver_preload(RANK_PRELOAD)


def stop_rank_server() -> None:
    """Stop the fork server (and wait for it, so a timing of the test run counts its ranks)."""
    from multiprocessing import forkserver

    forkserver._forkserver._stop()


def run_distributed(fn: Callable, world_size: int, *args) -> None:
    """Run `fn(rank, world_size, *args)` in `world_size` gloo processes on 127.0.0.1.

    Each worker gets its share of this process's threads (the shell's OMP_NUM_THREADS, else one
    per core): the ranks do not oversubscribe the cores, and on a bigger machine they run
    multi-threaded like the in-process side they are compared with, so the tolerances meet the
    rounding of any thread count instead of one pinned count."""
    import bigssl

    threads = max(1, torch.get_num_threads() // world_size)
    _rank_server()
    mp.start_processes(_entry, args=(fn, world_size, free_port(), threads, dict(os.environ), bigssl.__file__, args),
                       nprocs=world_size, join=True, start_method="forkserver")


def run_threaded(fn: Callable, world_size: int, *args, timeout: float = 120) -> list:
    """`fn(rank, world_size, *args)` on `world_size` ranks of this one process: a thread each, in
    torch's threaded process group, whose collectives (their autograd included) really exchange
    the ranks' tensors. Starts no process: a unit test of a collective's semantics. Returns the
    ranks' results; a rank's exception is raised here (and wakes the ranks waiting on it)."""
    import threading

    import torch.distributed as dist
    from torch.testing._internal.distributed import multi_threaded_pg as threaded

    results: list = [None] * world_size
    errors: list[BaseException] = []
    store = dist.HashStore()

    def rank_main(rank: int) -> None:
        dist.init_process_group("threaded", rank=rank, world_size=world_size, store=store)
        try:
            results[rank] = fn(rank, world_size, *args)
        except BaseException as err:  # re-raised below, in the caller
            errors.append(err)
            threaded.ProcessLocalGroup.exception_handle(err)
        finally:
            dist.destroy_process_group()

    torch._C._distributed_c10d._set_thread_isolation_mode(True)  # a group registry per thread
    threaded._install_threaded_pg()
    try:
        threads = [threading.Thread(target=rank_main, args=(rank,), daemon=True) for rank in range(world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout)
        hung = [rank for rank, thread in enumerate(threads) if thread.is_alive()]
    finally:
        threaded.ProcessLocalGroup.reset()
        threaded._uninstall_threaded_pg()
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
    if errors:
        raise errors[0]
    assert not hung, f"ranks {hung} did not finish in {timeout} s"
    return results


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """`count` intra-op threads in this process inside the block. An in-process recomputation of
    what a CLI run computed (one thread a process: worker_env) takes the run's rounding with its
    thread count, and on a 2-core machine its OpenMP team does not spin against the DataLoader
    worker it feeds from (measured: a kNN extraction of quickstart:train took 28 s of CPU on 2
    threads beside its worker on a busy 2-core machine, 1.6 s on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_cli(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: float = 600,
            launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = (launcher or [sys.executable, "-m"]) + ["bigssl", *args]
    return subprocess.run(command, cwd=cwd, env=env or worker_env(), capture_output=True, text=True,
                          timeout=timeout)


@contextlib.contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's -o size=, e.g. 400k) at `mount`: a disk that really fills up.
    Skips the test where mounting is not allowed (it needs root)."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:  # lazily if a failed test still holds a file open there: never leave it mounted
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path) -> Path:
    """Write zeros to `disk/filler` until the disk is full; returns the filler (delete it to free)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(bytes(4096))
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
    return filler
