from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_report_header(config: pytest.Config) -> str:
    """Float rounding depends on these: a tolerance report should name them."""
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return (f"torch {torch.__version__}: {torch.get_num_threads()} threads (OMP_NUM_THREADS {threads}), "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}")


@pytest.fixture(scope="session", autouse=True)
def quickstart_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart shards are written once per test session, into a private cache."""
    cache = os.environ.get("BIGSSL_TEST_CACHE") or str(tmp_path_factory.mktemp("bigssl-cache"))
    os.environ["BIGSSL_CACHE"] = cache
    return Path(cache)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """helpers.run_distributed's fork server stops with the session, waited for."""
    from helpers import stop_rank_server

    stop_rank_server()


SLURM_SCRIPT = Path(__file__).parent / "slurm" / "cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node SLURM on 127.0.0.1 (.ci/run installs slurm-wlm and munge); yields the
    environment its clients need."""
    if not Path("/usr/sbin/slurmctld").exists() or os.geteuid() != 0:
        pytest.skip("needs root and slurm-wlm + munge (apt-get; .ci/run installs them)")
    from helpers import free_port

    # munged wants every directory above its socket world-executable: pytest's are not.
    directory = tempfile.mkdtemp(prefix="bigssl-slurm-", dir="/tmp")
    env = {**os.environ, "SLURM_DIR": directory, "SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": str(free_port())}
    started = subprocess.run(["bash", "-c", f'source "{SLURM_SCRIPT}" && slurm_up && echo "$SLURM_CONF|$SLURM_PIDS"'],
                             env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    conf, pids = started.stdout.strip().splitlines()[-1].split("|")
    env["SLURM_CONF"] = conf
    yield {"SLURM_CONF": conf}
    subprocess.run(["bash", "-c", f'source "{SLURM_SCRIPT}" && SLURM_PIDS="{pids}" && slurm_down'], env=env,
                   capture_output=True, timeout=120)
    shutil.rmtree(directory, ignore_errors=True)


# Two steps of the quickstart recipe, narrowed (helpers.SMALL), a checkpoint after each.
SMALL_RUN = ["optim.max_steps=2", "checkpoint.every_steps=1", "eval.knn_at_end=false", "eval.knn_baseline=false",
             "eval.knn_pixels=false", "log.progress=false", "log.tensorboard=false"]
SMALL_RUN_ENGINES = {"ddp": ["engine.kind=ddp"], "fsdp": ["engine.kind=fsdp"],
                     "deepspeed": ["engine.kind=deepspeed", "engine.zero_stage=2"]}


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory):
    """`small_run(engine)`: the run directory of a two-step run of that engine (ddp, fsdp or
    deepspeed ZeRO-2; one process), trained once per session on first use, with checkpoints
    step_00000001 and step_00000002. Copy it before changing it: other tests share it."""
    from helpers import QUICKSTART, SMALL, run_cli

    root = tmp_path_factory.mktemp("small-runs")
    runs: dict[str, Path] = {}

    def run_of(engine: str) -> Path:
        if engine not in runs:
            run = root / engine
            result = run_cli("train", str(QUICKSTART), *SMALL, *SMALL_RUN, *SMALL_RUN_ENGINES[engine],
                             f"log.dir={run}")
            assert result.returncode == 0, result.stderr[-3000:]
            runs[engine] = run
        return runs[engine]

    return run_of


@pytest.fixture(scope="session")
def slurm_nodes():
    """A real 3-node SLURM on this machine, one network namespace per node
    (tests/multinode_cluster.py); started once for every test that asks for it."""
    import multinode_cluster

    missing = multinode_cluster.missing_requirements()
    if missing:
        pytest.skip(f"multi-node SLURM: {missing}")
    cluster = multinode_cluster.start()
    yield cluster
    cluster.down()
