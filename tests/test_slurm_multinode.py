"""Multi-node runs under a real SLURM of three nodes on this machine (tests/multinode_cluster.py:
one network namespace per node, with its own address, hostname and slurmd; gloo over the
namespaces' veth links). Every job is a real `sbatch` of slurm/train.sbatch, whose `srun` starts
the ranks on every node; PYTHON points at tests/slurm/python so that the tasks also know the
tests' own method (tests/multinode_methods.py, through tests/slurm/launch.py).

Slurm.conf lists gpu01, gpu02, cpu01 in that order; SLURM sorts node lists, so a 3-node job's list
is `cpu01,gpu[01-02]` and its task 0 runs on cpu01. Partition `gpu` holds gpu[01-02].
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from engine_cases import NO_BN, assert_same_loss_curve, global_batch, make_config, setup, train_steps
from helpers import REPO, worker_env
from multinode_cluster import Cluster
from multinode_methods import fingerprint
from safetensors.torch import load_file
from test_resume_exact import BAD, PER_SHARD, SAMPLES, textured_shards

from bigssl.checkpoint import Checkpointer
from bigssl.data.position import Consumed
from bigssl.data.shards import resolve
from bigssl.data.stream import StreamSpec, deal
from bigssl.distributed import env as env_lib
from bigssl.distributed.engines.consolidate import method_state

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
           partition: str = "gpu", nodelist: str = "", env: dict[str, str] | None = None) -> str:
    command = ["sbatch", "--parsable", f"--partition={partition}", f"--nodes={nodes}",
               f"--ntasks-per-node={tasks_per_node}", "--cpus-per-task=1", f"--output={log}",
               *([f"--nodelist={nodelist}"] if nodelist else []), str(TEMPLATE), *args]
    result = cluster.client(*command, env={**job_env(), **(env or {})}, cwd=REPO)
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


def wanted(request: pytest.FixtureRequest, fixture: str) -> bool:
    """Whether a selected test needs `fixture` (jobs no test looks at are not started)."""
    return any(fixture in item.fixturenames for item in request.session.items)


@pytest.fixture(scope="module")
def started(request: pytest.FixtureRequest, slurm_nodes: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every job of this module that needs only the cluster, submitted together so that they
    share its idle moments (start-up, the requeue delay): the engines job (section 2), the
    uninterrupted and the preempted recorder runs (section 3), the two runs that will lose a
    node (section 5; they wait at their fourth step until the others are done). A thread sends
    the preempted job USR1 once it holds at its third step."""
    root = tmp_path_factory.mktemp("jobs")
    (root / "recipe.yaml").write_text("method:\n  name: test_mn_recorder\n")
    data = textured_shards(root / "data")
    jobs: dict = {}
    if wanted(request, "engine_runs"):
        engines = jobs["engines"] = {"out": root / "engines", "log": root / "engines.out"}
        engines["id"] = submit(slurm_nodes, engines["log"], ["tests:engines", f"out={engines['out']}",
                                                             f"steps={STEPS}", f"methods={','.join(METHODS)}",
                                                             *ENGINES], NODES, TASKS)
    if wanted(request, "preempted"):
        runs = jobs["runs"] = {"root": root, "data": data, "whole": root / "whole", "cut": root / "cut"}
        runs["whole_job"] = submit(slurm_nodes, root / "whole.out", recorder_args(data, runs["whole"]), NODES, TASKS)
        runs["cut_job"] = submit(slurm_nodes, root / "cut.out",
                                 recorder_args(data, runs["cut"], f"method.hold_at_step={HOLD_AT}"), NODES, TASKS)

        def preempt() -> None:
            wait_for(Path(f"{runs['cut']}-ids-0.txt.holding"), root / "cut.out")
            # The warning a time limit gives (--signal=B:USR1@120), sent now, to the batch shell only.
            slurm_nodes.client("scancel", "--batch", "--signal=USR1", runs["cut_job"], check=True)

        runs["signal"] = threading.Thread(target=preempt, daemon=True)
        runs["signal"].start()
    if wanted(request, "node_lost"):
        jobs["lost"] = submit_node_losers(slurm_nodes, root, data)
    return jobs


@pytest.fixture(scope="module")
def engine_runs(slurm_nodes: Cluster, started: dict) -> tuple[Path, str]:
    """One 2-node × 2-task job trained every method under every engine in turn (one start for all)."""
    job = started["engines"]
    state = wait_done(slurm_nodes, job["id"], job["log"])
    assert state["JobState"] == "COMPLETED", tail(job["log"])
    return job["out"], job["log"].read_text()


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


# ---------------------------------------------------- 3. USR1 on a 2-node job, exact resume
# test_mn_recorder (tests/multinode_methods.py) on the noise shards of tests/test_resume_exact.py
# (230 samples in 10 shards, 5 undecodable), FSDP2 (a checkpoint is every rank's DCP shard), one
# epoch of 24-sample steps: 6 per rank on 2 × 2, 12 on 1 × 2, 8 on 3 × 1.
HOLD_AT = 2  # the preempted run waits at step index 2 until every rank has USR1: it stops after step 3


def recorder_args(data: str, run: Path, *extra: str) -> list[str]:
    return [str(run.parent / "recipe.yaml"), f"data.train={data}", "data.val=", "data.mode=exact", "data.workers=1",
            "data.views.size=8", "data.views.resize=8", "data.shuffle_buffer=20", "optim.batch_size=24",
            "optim.epochs=1", "optim.name=sgd", "optim.base_lr=0.5", "model.channels_last=false", "engine.kind=fsdp",
            f"log.dir={run}", "checkpoint.every_steps=0", "checkpoint.keep=10", "log.tensorboard=false",
            "log.progress=false", "log.every_steps=2", "engine.dead_rank_timeout_s=30",
            f"method.out={run}-ids-{{rank}}.txt", *extra]


def recorded(run: Path, rank: int) -> list[list[str]]:
    """Per step: step | host | ids | pixel sums | weights' sha256."""
    return [line.split(" | ") for line in Path(f"{run}-ids-{rank}.txt").read_text().splitlines()]


def metrics(run: Path) -> list[dict]:
    timing = ("time", "images_per_s", "data_wait_fraction", "memory/rss_gib")
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def wait_for(path: Path, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"no {path} after {timeout} s; log:\n{tail(log)}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def preempted(slurm_nodes: Cluster, started: dict) -> dict:
    """An uninterrupted 2 × 2 run and one sent USR1 at step 3 (as a time limit would, to the
    batch shell), which checkpoints, requeues itself and finishes."""
    runs = dict(started["runs"])
    root = runs["root"]
    runs["signal"].join(timeout=360)
    runs["cut_state"] = wait_done(slurm_nodes, runs["cut_job"], root / "cut.out")
    runs["whole_state"] = wait_done(slurm_nodes, runs["whole_job"], root / "whole.out")
    runs["cut_log"], runs["whole_log"] = (root / "cut.out").read_text(), (root / "whole.out").read_text()
    return runs


def test_usr1_on_two_nodes_checkpoints_every_rank_and_requeues_once(preempted: dict):
    state, log, job = preempted["cut_state"], preempted["cut_log"], preempted["cut_job"]
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log[-4000:]
    assert preempted["whole_state"]["JobState"] == "COMPLETED", preempted["whole_log"][-3000:]
    assert f"job {job} run 0 on gpu[01-02]" in log and f"job {job} run 1 on gpu[01-02]" in log, log[-4000:]
    assert "bigssl: SIGUSR1 received: stopped after step 3" in log, log[-4000:]
    assert log.count(f"requeued SLURM job {job}") == 1, log[-4000:]  # rank 0 alone, once
    assert "resumed from" in log and "step_00000003 (step 3)" in log, log[-4000:]
    # Both runs had every rank where SLURM put it, twice (the run and its rerun).
    ranks = re.findall(r"bigssl: rank (\d) of 4 \(local (\d)\) on (\w+), launcher slurm", log)
    assert sorted(ranks) == sorted(2 * [("0", "0", "gpu01"), ("1", "1", "gpu01"), ("2", "0", "gpu02"),
                                        ("3", "1", "gpu02")]), log[-4000:]
    # The stop checkpoint holds one DCP shard from each rank of both nodes, all in its manifest.
    stop = preempted["cut"] / "checkpoints" / "step_00000003"
    manifest = {entry["path"] for entry in json.loads((stop / "manifest.json").read_text())["files"]}
    assert {f"dcp/__{rank}_0.distcp" for rank in range(4)} <= manifest, manifest


def test_the_requeued_run_ends_as_the_uninterrupted_one(preempted: dict):
    whole, cut = preempted["whole"], preempted["cut"]
    for rank in range(NODES * TASKS):
        uninterrupted, resumed = recorded(whole, rank), recorded(cut, rank)
        assert len(uninterrupted) > HOLD_AT + 2  # it stopped mid-epoch
        # Same samples in the same batches, same crops and colours, same weights before each step.
        assert resumed == uninterrupted, rank
        assert {line[1] for line in resumed} == {"gpu01" if rank < 2 else "gpu02"}
    assert metrics(cut) == metrics(whole)  # every logged mean, lr and gradient norm
    final = [load_file(run / "backbone.safetensors") for run in (whole, cut)]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])


# ------------------------------------- 4. the same run resumed on 1 node × 2 and 3 nodes × 1
LAYOUTS = {"one_node": (1, 2), "three_nodes": (3, 1)}


@pytest.fixture(scope="module")
def resharded(slurm_nodes: Cluster, preempted: dict) -> dict[str, dict]:
    """The preempted run's step-3 checkpoint (4 DCP shards) resumed at other world sizes, both
    jobs at once; returns each run's directory, log and final job state."""
    root, runs = preempted["root"], {}
    for name, (nodes, tasks) in LAYOUTS.items():
        run = root / name
        shutil.copytree(preempted["cut"] / "checkpoints" / "step_00000003", run / "checkpoints" / "step_00000003")
        log = root / f"{name}.out"
        job = submit(slurm_nodes, log, recorder_args(preempted["data"], run), nodes, tasks, partition="all")
        runs[name] = {"run": run, "log": log, "job": job}
    for values in runs.values():
        values["state"] = wait_done(slurm_nodes, values["job"], values["log"])
        values["log"] = values["log"].read_text()
    return runs


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_resume_at_another_node_count_reshards_and_keeps_the_data_position(
        preempted: dict, resharded: dict[str, dict], layout: str):
    nodes, tasks = LAYOUTS[layout]
    world = nodes * tasks
    run, log = resharded[layout]["run"], resharded[layout]["log"]
    assert resharded[layout]["state"]["JobState"] == "COMPLETED", log[-4000:]
    assert "step_00000003 (step 3)" in log, log[-4000:]
    assert f"global batch 24, {world} ranks), resuming at step 3" in log, log[-4000:]
    placed = sorted(re.findall(rf"bigssl: rank (\d) of {world} \(local (\d)\) on (\w+), launcher slurm", log))
    if layout == "three_nodes":  # nodes listed cpu01,gpu[01-02]: task 0 on cpu01
        assert placed == [("0", "0", "cpu01"), ("1", "0", "gpu01"), ("2", "0", "gpu02")], log[-4000:]
    else:
        assert [(r, local) for r, local, _ in placed] == [("0", "0"), ("1", "1")] and placed[0][2] == placed[1][2]

    # The weights every rank holds before its first step are the 4-rank run's after step 3,
    # bit for bit (the shards of 4 ranks reassembled for 2 or 3).
    after_three = recorded(preempted["whole"], 0)[3][4]
    resumed = [recorded(run, rank) for rank in range(world)]
    assert all(lines[0][0] == "3" and lines[0][4] == after_three for lines in resumed)

    # The data position: the samples of steps 1-3 (4 ranks) are the checkpoint's; the resumed
    # ranks read only what was left (none twice), each from the shards dealt to it afresh, and
    # the epoch went on until some rank could not fill a step (none lost that could be trained).
    before = [int(i) for rank in range(4) for line in recorded(preempted["cut"], rank)[:3] for i in line[2].split()]
    extra = torch.load(preempted["cut"] / "checkpoints" / "step_00000003" / "extra.pt", weights_only=True)["extra"]
    consumed, bad = Consumed.from_state(extra["consumed"]), Consumed.from_state(extra["bad"])
    assert sorted(before) == sorted(s * PER_SHARD + o for s in range(SAMPLES // PER_SHARD) for o in range(PER_SHARD)
                                    if consumed.contains(s, o) and not bad.contains(s, o))
    after = [[int(i) for line in lines for i in line[2].split()] for lines in resumed]
    everything = before + [i for ids in after for i in ids]
    assert len(everything) == len(set(everything)) and not set(everything) & BAD
    shard_set = resolve(preempted["data"])
    spec = StreamSpec(mode="exact", seed=0, epoch=0, world_size=world)  # seed: the config's default
    dealt = deal(shard_set, spec, workers=1, consumed=consumed)
    local_batch = 24 // world
    left_over = []
    for rank, ids in enumerate(after):
        mine = {s * PER_SHARD + o for worker in dealt[rank] for s in worker for o in range(PER_SHARD)
                if not consumed.contains(s, o)} - BAD
        assert set(ids) <= mine, rank
        left_over.append(len(mine - set(ids)))
    assert min(left_over) < local_batch, left_over


# ----------------------------------------------------------------------------- 5. a node lost
DEAD_RANK_TIMEOUT = 5


def submit_node_losers(cluster: Cluster, root: Path, data: str) -> dict[str, dict]:
    """The two runs of section 5; every rank will wait at step 4 until the file `go` exists."""
    jobs = {"peer": {"nodes": 2, "tasks": 2, "partition": "gpu", "nodelist": "", "lose": "gpu02"},
            "store": {"nodes": 2, "tasks": 1, "partition": "all", "nodelist": "cpu01,gpu01", "lose": "cpu01"}}
    for name, job in jobs.items():
        job["run"], job["log"], job["go"] = root / f"lost-{name}", root / f"lost-{name}.out", root / "go"
        job["stderr"] = root / f"lost-{name}-err-%t.txt"  # each task's stderr, written on its own node
        args = recorder_args(data, job["run"], "checkpoint.every_steps=2", "method.hold_at_step=3",
                             f"method.hold_for={job['go']}", f"engine.dead_rank_timeout_s={DEAD_RANK_TIMEOUT}")
        env = {"SLURM_STDERRMODE": str(job["stderr"])} if name == "store" else {}
        job["id"] = submit(cluster, job["log"], args, job["nodes"], job["tasks"], job["partition"], job["nodelist"],
                           env)
    return jobs


@pytest.fixture(scope="module")
def node_lost(slurm_nodes: Cluster, started: dict) -> dict:
    """Two runs, each loses a node at step 4 (every rank waits there until told to go):
    - `peer`: 2 × 2 on gpu[01-02], gpu02 lost (ranks 2 and 3); its log stays, written on gpu01;
    - `store`: 2 × 1 on cpu01 and gpu01, cpu01 lost: rank 0, the rendezvous store and the batch
      script with srun, which wrote the log; each task's stderr also goes to a file of its own.
    A lost node first drops off the network, then every process on it dies: the others hear
    nothing, no connection is reset (Cluster.lose)."""
    jobs = started["lost"]
    for job in jobs.values():  # every rank holds at step 4: step 2's checkpoint is published
        marks = [Path(f"{job['run']}-ids-{rank}.txt.holding") for rank in range(job["nodes"] * job["tasks"])]
        for mark in marks:
            wait_for(mark, job["log"], timeout=600)
        job["pids"] = [mark.read_text().split()[1] for mark in marks]
    ours, deadline = {job["id"] for job in jobs.values()}, time.monotonic() + 600
    while set(slurm_nodes.client("squeue", "-h", "-o", "%i").stdout.split()) - ours:  # the loss kills all there
        assert time.monotonic() < deadline, slurm_nodes.client("squeue").stdout
        time.sleep(0.5)
    lost_at = time.monotonic()
    try:
        for job in jobs.values():
            slurm_nodes.lose(job["lose"])
        next(iter(jobs.values()))["go"].touch()  # the survivors go on into the step's collectives
        deadline = time.monotonic() + 120
        for name, job in jobs.items():
            while None in survivor_errors(name, job) and time.monotonic() < deadline:
                time.sleep(0.2)
            job["stopped_after"] = time.monotonic() - lost_at
            job["errors"] = survivor_errors(name, job)
    finally:
        for job in jobs.values():
            slurm_nodes.client("scancel", job["id"])
        for job in jobs.values():
            slurm_nodes.restore(job["lose"])  # for any test after these
    for job in jobs.values():
        job["state"] = wait_done(slurm_nodes, job["id"], job["log"], timeout=120)
        job["log"] = job["log"].read_text()
    return jobs


def survivor_errors(name: str, job: dict) -> list[str | None]:
    """The `bigssl: error:` line of each surviving rank, None while it has none."""
    if name == "peer":  # ranks 0 and 1, in the job log (srun runs on gpu01)
        text = job["log"].read_text() if job["log"].exists() else ""
        sources = [(text, 0), (text, 1)]
    else:  # rank 1, in its own stderr file (the log's srun died with cpu01)
        path = Path(str(job["stderr"]).replace("%t", "1"))
        sources = [(path.read_text() if path.exists() else "", 1)]
    return [next((line for line in text.splitlines() if line.startswith("bigssl: error:")
                  and line.endswith(f"rank {rank} stops (engine.dead_rank_timeout_s sets the limit)")), None)
            for text, rank in sources]


def test_a_lost_node_stops_the_other_nodes_ranks_naming_it(node_lost: dict):
    job = node_lost["peer"]
    pids = job["pids"]
    named = f"ranks 2, 3 (gpu02, pids {pids[2]}, {pids[3]}) sent no heartbeat for {DEAD_RANK_TIMEOUT} s"
    assert None not in job["errors"], job["log"][-4000:]
    rank0, rank1 = job["errors"]
    assert named in rank0 and f"rank 0 reports {named}" in rank1, job["errors"]
    # One line from each survivor, and no other (rank 1 tells what rank 0 saw, before rank 0 leaves).
    errors = [line for line in job["log"].splitlines() if line.startswith("bigssl: error:")]
    assert sorted(errors) == sorted(job["errors"]), errors
    assert job["stopped_after"] < DEAD_RANK_TIMEOUT + 15, job["stopped_after"]
    print(f"gpu02 lost: ranks 0 and 1 stopped {job['stopped_after']:.1f} s later")


def test_a_lost_rendezvous_node_stops_the_other_nodes_ranks_naming_it(node_lost: dict):
    job = node_lost["store"]
    assert None not in job["errors"], job["log"][-3000:]
    assert f"rank 0 (cpu01, pid {job['pids'][0]}), which hosts the rendezvous store, has not answered for" \
        in job["errors"][0], job["errors"]
    assert job["stopped_after"] < DEAD_RANK_TIMEOUT + 15, job["stopped_after"]
    print(f"cpu01 lost: rank 1 stopped {job['stopped_after']:.1f} s later")


@pytest.mark.parametrize("name", ["peer", "store"])
def test_the_last_checkpoint_before_the_loss_verifies_and_loads(node_lost: dict, name: str):
    run, warnings = node_lost[name]["run"], []
    checkpoint = Checkpointer(run, keep=10, is_main=True).resumable(warnings.append)
    assert checkpoint == run / "checkpoints" / "step_00000002" and not warnings, warnings
    state = method_state(checkpoint)  # what `bigssl export` merges: all ranks' DCP shards
    order = ["backbone.0.weight", "backbone.0.bias", "backbone.2.weight", "backbone.2.bias"]
    assert fingerprint(state[key] for key in order) == recorded(run, 0)[2][4]  # the weights after step 2
