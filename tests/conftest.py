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
