"""Multi-node runs under a real SLURM of three nodes on this machine (tests/multinode_cluster.py:
one network namespace per node, with its own address, hostname and slurmd; gloo over the
namespaces' veth links). Every job is a real `sbatch` of slurm/train.sbatch, whose `srun` starts
the ranks on every node; PYTHON points at tests/slurm/python so that the tasks also know the
tests' own method (tests/slurm/launch.py).

Slurm.conf lists gpu01, gpu02, cpu01 in that order; SLURM sorts node lists, so a 3-node job's list
is `cpu01,gpu[01-02]` and its task 0 runs on cpu01. Partition `gpu` holds gpu[01-02].
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_cases import NO_BN, assert_same_loss_curve, global_batch, make_config, setup, train_steps
from helpers import REPO, worker_env
from multinode_cluster import Cluster

from bigssl.distributed import env as env_lib

pytestmark = [pytest.mark.distributed, pytest.mark.slurm]

TEMPLATE = REPO / "slurm" / "train.sbatch"
SHIM = REPO / "tests" / "slurm" / "python"
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
        "DEADLINE")


# ------------------------------------------------------------------------------------ helpers
def job_env() -> dict[str, str]:
    """What the submitting shell exports to the job (sbatch's default --export=ALL)."""
    env = worker_env()
    # Gloo's interface on the nodes; worker_env's `lo` cannot reach another node. (A real
    # cluster names its own: GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, slurm/README.md.)
    env["GLOO_SOCKET_IFNAME"] = "eth0"
    env.update({"PYTHON": str(SHIM), "BIGSSL_TEST_PYTHON": sys.executable, "PYTHONPATH": str(REPO)})
    return env


def submit(cluster: Cluster, log: Path, args: list[str], nodes: int, tasks_per_node: int,
           partition: str = "gpu") -> str:
    command = ["sbatch", "--parsable", f"--partition={partition}", f"--nodes={nodes}",
               f"--ntasks-per-node={tasks_per_node}", "--cpus-per-task=1", f"--output={log}", str(TEMPLATE), *args]
    result = cluster.client(*command, env=job_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_state(cluster: Cluster, job: str) -> dict[str, str]:
    shown = cluster.client("scontrol", "show", "job", job).stdout
    return dict(field.split("=", 1) for field in shown.split() if "=" in field)


def wait_done(cluster: Cluster, job: str, log: Path, timeout: float = 600) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(cluster, job)
        if state.get("JobState") in DONE:
            return state
        time.sleep(0.3)
    cluster.client("scancel", job)
    pytest.fail(f"job {job} not done after {timeout} s; log:\n{tail(log)}")


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text()[-chars:] if log.exists() else f"(no {log})"


# ---------------------------------------------------------------------------- 1. node lists
NODELISTS = ["gpu[01-04,07]", "a[1-2],b3", "gpu[007-010],cpu[1-2]", "n[9-11]", "n[098-101]", "cpu01,gpu[01-02]",
             "a-b-c[7-9],other[1-2]", "rack[1-2]-node[01-02]", "x[3,1],y2", "node01"]


@pytest.mark.parametrize("nodelist", NODELISTS)
def test_nodelist_expands_as_scontrol_show_hostnames(slurm_nodes: Cluster, nodelist: str):
    listed = slurm_nodes.client("scontrol", "show", "hostnames", nodelist, check=True).stdout.split()
    assert env_lib.hostnames(nodelist) == listed
    assert env_lib.first_host(nodelist) == listed[0]


def test_rendezvous_is_the_first_node_of_the_step_not_of_the_job(slurm_nodes: Cluster):
    """A step on part of the allocation (`srun --relative=1`) runs its task 0 on the job's
    second node: the rendezvous must be there."""
    probe = ("import os, socket; from bigssl.distributed.env import detect; e = detect(); "
             "print('rank', e.rank, socket.gethostname(), e.master_addr, os.environ['SLURM_JOB_NODELIST'])")
    result = slurm_nodes.client("salloc", "--nodes=3", "--ntasks-per-node=1", "srun", "--nodes=2", "--ntasks=2",
                                "--relative=1", sys.executable, "-c", probe, env=job_env(), cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = sorted(line.split() for line in result.stdout.splitlines() if line.startswith("rank"))
    assert [line[1] for line in lines] == ["0", "1"], result.stdout
    job_first = env_lib.first_host(lines[0][4])
    rank0_host = lines[0][2]
    assert rank0_host != job_first  # the step really started past the job's first node
    assert {line[3] for line in lines} == {rank0_host}  # every rank meets where rank 0 is


# ---------------------------------------------------------------- 2. engines on 2 nodes × 2
ENGINES = ["ddp", "fsdp", "zero1", "zero2", "zero3"]
# SimCLR gathers its negatives from every rank; the BYOL-shaped test_tiny_ema has a per-row loss
# and an EMA teacher. Neither has BatchNorm (its statistics are per rank), so the mean of the
# ranks' losses is the loss of their joint batch. SimCLR on these noise batches soon sits near
# chance (ln 31): its curve tells little after the first update, test_tiny_ema's moves (a 10 %
# smaller lr changes it by 1.5e-3 after 1 update and 3.5e-2 after 4, tolerance 1e-5 per update).
METHODS = ["simclr", "test_tiny_ema"]
STEPS = 5
NODES, TASKS = 2, 2


@pytest.fixture(scope="module")
def engine_runs(slurm_nodes: Cluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One 2-node × 2-task job trains every method under every engine in turn (one start for all)."""
    out = tmp_path_factory.mktemp("engines")
    log = out / "job.out"
    args = ["tests:engines", f"out={out}", f"steps={STEPS}", f"methods={','.join(METHODS)}", *ENGINES]
    job = submit(slurm_nodes, log, args, NODES, TASKS)
    state = wait_done(slurm_nodes, job, log)
    assert state["JobState"] == "COMPLETED", tail(log)
    return out, log.read_text()


def test_every_rank_knows_its_node_local_rank_and_world(engine_runs: tuple[Path, str]):
    _, log = engine_runs
    placed = re.findall(r"bigssl-test: rank (\d) of 4, local rank (\d) of 2, on (\w+) \(node (\d) of 2\), "
                        r"rendezvous (\w+):", log)
    assert sorted(placed) == [("0", "0", "gpu01", "0", "gpu01"), ("1", "1", "gpu01", "0", "gpu01"),
                              ("2", "0", "gpu02", "1", "gpu01"), ("3", "1", "gpu02", "1", "gpu01")], log[-3000:]


@pytest.fixture(scope="module")
def one_process_losses() -> dict[str, list[float]]:
    """One process, the whole batch of the 4 ranks at every step (any engine: DDP alone)."""
    losses = {}
    for method in METHODS:
        engine = setup(make_config(method, NO_BN), rank=0, world_size=1)
        losses[method] = train_steps(engine, range(STEPS), lambda step: global_batch(NODES * TASKS, step))["losses"]
    return losses


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", METHODS)
def test_two_nodes_give_the_losses_of_one_process_with_the_whole_batch(
        engine_runs: tuple[Path, str], one_process_losses: dict[str, list[float]], method: str, engine: str):
    out, _ = engine_runs
    ranks = [torch.load(out / method / engine / f"rank{r}.pt", weights_only=True)["losses"]
             for r in range(NODES * TASKS)]
    mean = [sum(step) / len(step) for step in zip(*ranks, strict=True)]
    expected = one_process_losses[method]
    assert_same_loss_curve(mean, expected)
    assert expected[0] != expected[-1]  # it trained
