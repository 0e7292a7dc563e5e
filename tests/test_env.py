import pytest

from bigssl.distributed import env
from bigssl.errors import UserError


@pytest.mark.parametrize(("nodelist", "host"), [
    ("node1", "node1"),
    ("gpu[003-005,010]", "gpu003"),
    ("gpu[12,14]", "gpu12"),
    ("a-b-c[7-9],other[1-2]", "a-b-c7"),
    ("cpu1,cpu2", "cpu1"),
])
def test_first_host_of_slurm_nodelist(nodelist: str, host: str):
    assert env.first_host(nodelist) == host


@pytest.mark.parametrize(("nodelist", "hosts"), [
    ("gpu[01-02,07],cpu1", ["gpu01", "gpu02", "gpu07", "cpu1"]),
    ("n[9-11]", ["n9", "n10", "n11"]),  # the width of the lower bound, as SLURM pads
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),  # several groups: their product
    ("x[3,1],y2", ["x3", "x1", "y2"]),  # not sorted: SLURM's order
])
def test_hostnames_of_slurm_nodelist(nodelist: str, hosts: list[str]):
    """(tests/test_slurm_multinode.py checks more against SLURM's own `scontrol show hostnames`.)"""
    assert env.hostnames(nodelist) == hosts
    assert env.first_host(nodelist) == hosts[0]


@pytest.mark.parametrize("nodelist", ["gpu[01-", "gpu[a-b]", "n[3-1]", "", "gpu]01["])
def test_a_malformed_nodelist_is_a_user_error(nodelist: str):
    with pytest.raises(UserError, match="cannot parse the SLURM node list"):
        env.first_host(nodelist)


def clear(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                 "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST",
                 "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)


def test_single_process_by_default(monkeypatch: pytest.MonkeyPatch):
    clear(monkeypatch)
    assert env.detect() == env.DistEnv()


def test_torchrun_environment(monkeypatch: pytest.MonkeyPatch):
    clear(monkeypatch)
    monkeypatch.setenv("SLURM_PROCID", "5")  # torchrun inside a SLURM job: torchrun's values win
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    for name, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2",
                        "MASTER_PORT": "29511"}.items():
        monkeypatch.setenv(name, value)
    assert env.detect() == env.DistEnv(3, 4, 1, "10.0.0.2", 29511, "torchrun")


def test_slurm_environment(monkeypatch: pytest.MonkeyPatch):
    clear(monkeypatch)
    for name, value in {"SLURM_PROCID": "6", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8",
                        "SLURM_LOCALID": "2", "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_JOB_ID": "12345"}.items():
        monkeypatch.setenv(name, value)
    detected = env.detect()
    assert (detected.rank, detected.world_size, detected.local_rank) == (6, 8, 2)
    assert detected.master_addr == "gpu003"
    assert detected.master_port == 20000 + 12345 % 20000
    assert detected.launcher == "slurm"


def test_slurm_rendezvous_is_the_first_node_of_the_step(monkeypatch: pytest.MonkeyPatch):
    """`srun --relative=1` (or --nodelist) on part of the allocation runs task 0 on the step's
    first node (measured: tests/test_slurm_multinode.py)."""
    clear(monkeypatch)
    for name, value in {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "cpu01,gpu[01-02]",
                        "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "7"}.items():
        monkeypatch.setenv(name, value)
    assert env.detect().master_addr == "gpu01"


def test_slurm_batch_script_alone_is_one_process(monkeypatch: pytest.MonkeyPatch):
    clear(monkeypatch)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")  # the batch step, before srun starts the tasks
    assert env.detect().world_size == 1
