"""How runs end (issue 18, "Messages"): one clear line and a documented exit code (README, "Exit
codes") for a lost rank on either path, a config error under a launcher, a stop signal during
start-up, a data error at start; and what torchrun adds around them."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import make_shards
from helpers import QUICKSTART, REPO, run_cli, worker_env

from bigssl import cli
from bigssl.errors import EXIT_RANK_LOST, EXIT_STOPPED, EXIT_USER, RankLost

TINY = ["model.backbone_args.channels=[8,16,32,64]", "model.projector.hidden_dim=32", "model.projector.out_dim=16",
        "optim.batch_size=32", "data.workers=0", "data.val=", "log.progress=false", "log.tensorboard=false",
        "eval.knn_at_end=false", "eval.knn_baseline=false", "checkpoint.every_steps=0"]


def test_a_lost_rank_found_by_a_failed_collective_exits_3_like_the_watchdog(tmp_path: Path, monkeypatch,
                                                                             capsys: pytest.CaptureFixture):
    """The watchdog thread exits 3; the same loss noticed by a failed collective raised RankLost,
    which left with 1 and `bigssl: RankLost: ...`."""
    import bigssl.train

    def lose_rank_1(config, stop_request=None):
        raise RankLost("rank 1 (node7, pid 4242) stopped sending heartbeats (the process exited or hangs)")

    monkeypatch.setattr(bigssl.train, "train", lose_rank_1)
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert cli.main(["train", str(QUICKSTART), f"log.dir={tmp_path / 'run'}"]) == EXIT_RANK_LOST == 3
    line = "bigssl: error: rank 1 (node7, pid 4242) stopped sending heartbeats (the process exited or hangs)"
    assert capsys.readouterr().err == line + "\n"
    # torchrun's failure report shows this file's message in place of "To enable traceback see: ..."
    assert json.loads(error_file.read_text())["message"]["message"] == line


def test_a_config_error_is_reported_by_rank_0_alone(monkeypatch, capsys: pytest.CaptureFixture):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(cli, "SILENT_RANK_GRACE_S", 0.2)
    started = time.monotonic()
    assert cli.main(["train", str(QUICKSTART), "optim.bach_size=3"]) == EXIT_USER
    assert capsys.readouterr().err == ""  # every rank has the same recipe: one copy of the line is enough
    assert time.monotonic() - started >= 0.2  # and leaves after rank 0 has said it
    # A recipe missing on this node may be there on rank 0's: every rank says so.
    assert cli.main(["train", "/nonexistent/recipe.yaml"]) == EXIT_USER
    assert capsys.readouterr().err == "bigssl: error: recipe file not found: /nonexistent/recipe.yaml\n"
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["train", str(QUICKSTART), "optim.bach_size=3"]) == EXIT_USER
    assert capsys.readouterr().err.startswith("bigssl: error: optim.bach_size: Key 'bach_size' not in")


@pytest.mark.distributed
def test_under_torchrun_a_config_error_is_one_line_and_the_report_carries_it(tmp_path: Path):
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run([str(torchrun), "--nproc_per_node=2", "-m", "bigssl", "train", str(QUICKSTART),
                             "optim.bach_size=3"], cwd=REPO, env=worker_env(), capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    line = "bigssl: error: optim.bach_size: Key 'bach_size' not in 'OptimConfig'. Did you mean: 'batch_size'?"
    assert output.splitlines().count(line) == 1, output  # printed once (it was once per rank)
    # What torchrun adds and bigssl cannot change: its own exit code 1 and a ChildFailedError
    # report (README, "Exit codes"), whose entries now show each rank's code 2 and bigssl's line.
    assert result.returncode == 1
    assert "exitcode  : 2" in output and f"traceback : {line}" in output, output


STORE_HOST = r"""
import time
import torch.distributed as dist
store = dist.TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False)
print(store.port, flush=True)
time.sleep(120)
"""

RANK_1 = r"""
import datetime, sys, time
from bigssl.cli import _quiet_native_logs
_quiet_native_logs()  # what `bigssl train` and `bigssl eval` do before torch loads
import torch.distributed as dist
from bigssl.distributed import watchdog
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), 2, False, timeout=datetime.timedelta(seconds=60))
watchdog.start(store, rank=1, world_size=2, interval_s=0.2, timeout_s=600)  # only the lost store can end it
print("beating", flush=True)
time.sleep(120)
"""


def _first_line(process: subprocess.Popen, timeout: float = 120) -> str:
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, "no output within the timeout"
    return process.stdout.readline().strip()


@pytest.mark.distributed
def test_losing_rank_0_prints_one_line_and_exits_3(tmp_path: Path):
    """Rank 0 hosts the rendezvous store: when it dies, the others' heartbeat fails first, and
    torch's C++ layer logged a ~25-line stack dump as a warning before bigssl's line."""
    env = {**worker_env(), "RANK": "1", "WORLD_SIZE": "2"}
    host = subprocess.Popen([sys.executable, "-c", STORE_HOST], cwd=REPO, env=worker_env(), stdout=subprocess.PIPE,
                            text=True)
    ranks = []
    try:
        port = _first_line(host)
        for level in (None, "WARNING"):  # bigssl's default; and the user's own choice, which is kept
            extra = {"TORCH_CPP_LOG_LEVEL": level} if level else {}
            ranks.append(subprocess.Popen([sys.executable, "-c", RANK_1, port], cwd=REPO, env={**env, **extra},
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        assert [_first_line(rank) for rank in ranks] == ["beating", "beating"]
        host.kill()
        outcomes = [rank.communicate(timeout=60) for rank in ranks]
    finally:
        for process in (host, *ranks):
            if process.poll() is None:
                process.kill()
            process.wait()
    (_, quiet), (_, verbose) = outcomes
    assert [rank.returncode for rank in ranks] == [EXIT_RANK_LOST, EXIT_RANK_LOST]
    assert quiet.startswith("bigssl: error: rank 0") and "which hosts the rendezvous store" in quiet, quiet
    assert quiet.count("\n") == 1, quiet
    # The dump bigssl now keeps out. (The socket's own words, reset or closed, vary with timing.)
    last = verbose.splitlines()[-1]
    assert "frame #" in verbose and last.startswith("bigssl: error: rank 0") and "rendezvous store" in last


def _handles_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (its SigCgt mask, /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def test_sigterm_during_start_up_stops_after_the_first_step_with_75(tmp_path: Path):
    """Sent while the process still imports torch: it was killed by the signal (-15)."""
    command = [sys.executable, "-m", "bigssl", "train", str(QUICKSTART), *TINY, "optim.max_steps=3",
               f"log.dir={tmp_path / 'run'}"]
    process = subprocess.Popen(command, cwd=REPO, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 60
        while not _handles_sigterm(process.pid):
            assert process.poll() is None and time.monotonic() < deadline, "no SIGTERM handler was installed"
            time.sleep(0.002)
        still_importing = "libtorch" not in Path(f"/proc/{process.pid}/maps").read_text()
        os.kill(process.pid, signal.SIGTERM)
        _, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert still_importing  # the signal came before torch had loaded
    assert process.returncode == EXIT_STOPPED, err[-2000:]
    assert "bigssl: SIGTERM received: stopped after step 1, checkpoint" in err
    assert (tmp_path / "run" / "checkpoints" / "step_00000001").is_dir()


def test_a_data_error_at_start_is_the_only_line(tmp_path: Path):
    """No `bigssl: rank 0 of 1 ...` banner before it; and a directory given as data.train is
    called one, with the pattern to pass instead (it was "shard not found")."""
    shards = make_shards(tmp_path / "ds", 8, 4)
    result = run_cli("train", str(QUICKSTART), *TINY, f"data.train={shards}", f"log.dir={tmp_path / 'run'}",
                     timeout=300)
    assert result.returncode == EXIT_USER
    assert result.stderr == (f"bigssl: error: data.train: {shards} is a directory, not a shard; pass its shards "
                             f"as a brace pattern: {shards}/shard-{{000000..000001}}.tar\n")


@pytest.mark.distributed
def test_under_srun_a_config_error_reaches_the_shell_as_2(slurm_cluster: dict[str, str]):
    """Once one task exited, srun --kill-on-bad-exit sent SIGTERM to the other: seen as rc 143
    with no line at all, when rank 1 (which keeps a config error to itself) was first out."""
    result = run_cli("train", str(QUICKSTART), "optim.bach_size=3", env={**worker_env(), **slurm_cluster},
                     launcher=["srun", "--ntasks=2", "--kill-on-bad-exit=1", sys.executable, "-m"], timeout=300)
    output = result.stdout + result.stderr
    line = "bigssl: error: optim.bach_size: Key 'bach_size' not in 'OptimConfig'. Did you mean: 'batch_size'?"
    assert result.returncode == EXIT_USER, output  # srun exits with its tasks' highest code
    assert output.splitlines().count(line) == 1, output
