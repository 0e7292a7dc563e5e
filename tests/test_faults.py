"""Faults a long run meets: a rank killed or frozen, a loss that turns non-finite, a stop signal.

The dead-rank tests start two real ranks as separate processes (so one can be killed with
SIGKILL or frozen with SIGSTOP) and time how long the survivor takes to leave.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from datasets import make_shards, pattern
from helpers import QUICKSTART, REPO, free_port, run_distributed, worker_env
from torch import nn

from bigssl import recipes
from bigssl.config import MethodConfig
from bigssl.distributed import comm, watchdog
from bigssl.errors import EXIT_RANK_LOST
from bigssl.methods.base import Method, StepOutput, register
from bigssl.train import TrainingDiverged, train

TINY = ["model.backbone_args.channels=[8,16,32,64]", "model.projector.hidden_dim=32", "model.projector.out_dim=16",
        "optim.batch_size=32", "data.workers=1", "log.every_steps=1", "log.progress=false", "log.tensorboard=false",
        "eval.knn_at_end=false", "eval.knn_baseline=false", "eval.knn_pixels=false", "checkpoint.every_steps=0"]


# ------------------------------------------------------------------------------ non-finite loss
@dataclass
class NanAtConfig(MethodConfig):
    name: str = "test_nan_at"
    nan_steps: list[int] = field(default_factory=list)  # steps whose loss is NaN
    nan_rank: int = -1  # only on this rank (-1: every rank)
    weights_log: str = ""


@register("test_nan_at")
class NanAt(Method):
    """A linear map trained towards zero output; NaN loss at the chosen steps. Writes its weight
    as the step begins, so a test can see whether a skipped step changed it."""

    config_class = NanAtConfig
    config: NanAtConfig

    def build(self) -> None:
        self.backbone = nn.Linear(3, 2)

    def training_step(self, batch, step):
        method = self.config
        with open(method.weights_log.format(rank=comm.rank()), "a") as handle:
            handle.write(json.dumps({"step": step, "weight": self.backbone.weight.detach().flatten().tolist()}) + "\n")
        pooled = batch["views"][0].mean(dim=(0, 3, 4))
        loss = self.backbone(pooled).pow(2).mean()
        if step in method.nan_steps and method.nan_rank in (-1, comm.rank()):
            loss = loss * float("nan")
        return StepOutput(loss)


def nan_overrides(tmp_path: Path, nan_steps: list[int], limit: int) -> list[str]:
    shards = make_shards(tmp_path / "ds", 96, 16)
    return [f"data.train={pattern(shards, 6)}", "data.val=", "data.mode=exact", "data.workers=0",
            "data.views.size=8", "optim.batch_size=8", "optim.epochs=1", "optim.name=sgd", "optim.base_lr=2.0",
            "optim.warmup_epochs=0", "model.channels_last=false", f"log.dir={tmp_path / 'run'}", "log.every_steps=1",
            "log.tensorboard=false", "log.progress=false", "checkpoint.every_steps=2",
            f"method.nan_steps={json.dumps(nan_steps)}", f"optim.nonfinite_limit={limit}",
            f"method.weights_log={tmp_path / 'weights.jsonl'}"]


def weights_by_step(tmp_path: Path, rank: int | None = None) -> dict[int, list[float]]:
    lines = (tmp_path / ("weights.jsonl" if rank is None else f"weights-{rank}.jsonl")).read_text().splitlines()
    return {r["step"]: r["weight"] for r in map(json.loads, lines)}


def _train_rank(rank: int, world_size: int, recipe: Path, overrides: list[str]) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size)})  # the group is up already
    train(recipes.load(recipe, overrides))


@pytest.mark.distributed
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_both(tmp_path: Path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method:\n  name: test_nan_at\n")
    overrides = [*nan_overrides(tmp_path, [3], limit=2), "method.nan_rank=1", "optim.batch_size=16",
                 f"method.weights_log={tmp_path / 'weights-{rank}.jsonl'}"]
    run_distributed(_train_rank, 2, recipe, overrides)
    for rank in range(2):
        weights = weights_by_step(tmp_path, rank)
        assert weights[4] == weights[3] != weights[2]  # rank 0's loss was finite: it skipped too
        assert weights[5] != weights[4]
    assert weights_by_step(tmp_path, 0) == weights_by_step(tmp_path, 1)  # replicas stay identical


def test_nonfinite_loss_skips_the_step_and_is_logged(tmp_path: Path, capfd: pytest.CaptureFixture):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method:\n  name: test_nan_at\n")
    train(recipes.load(recipe, nan_overrides(tmp_path, [3, 7], limit=2)))
    weights = weights_by_step(tmp_path)
    assert weights[4] == weights[3] and weights[8] == weights[7]  # the NaN steps changed nothing
    assert weights[3] != weights[2] and weights[5] != weights[4]  # the others did
    assert all(torch.isfinite(torch.tensor(w)).all() for w in weights.values())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r for r in records if "loss" in r}
    assert 4 not in losses and 8 not in losses  # a window of one skipped step has nothing to log
    assert losses[5]["nonfinite_steps"] == 1 and losses[12]["nonfinite_steps"] == 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in losses.values())
    assert "step 4: the loss is not finite on some rank; step skipped" in capfd.readouterr().err


def test_nonfinite_losses_in_a_row_stop_the_run_keeping_the_last_checkpoint(tmp_path: Path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method:\n  name: test_nan_at\n")
    # Step indices 5-9 (steps 6-10 in metrics.jsonl numbering) have NaN losses: 3 in a row stop it.
    with pytest.raises(TrainingDiverged, match=r"optim.nonfinite_limit: .* 3 steps in a row \(steps 6-8\)"):
        train(recipes.load(recipe, nan_overrides(tmp_path, [5, 6, 7, 8, 9], limit=3)))
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000004", "step_00000006"]  # none after step 8; step 6's weights = step 5's
    weights = weights_by_step(tmp_path)
    assert max(weights) == 7  # it stopped in the third NaN step
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    assert state["method"]["backbone.weight"].flatten().tolist() == weights[5] == weights[7]


# --------------------------------------------------------------------------------- dead ranks
def start_two_ranks(tmp_path: Path, *extra: str) -> list[subprocess.Popen]:
    port = str(free_port())
    ranks = []
    for rank in range(2):
        env = {**worker_env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        command = [sys.executable, "-m", "bigssl", "train", str(QUICKSTART), *TINY, f"log.dir={tmp_path / 'run'}",
                   "engine.dead_rank_timeout_s=6", *extra]
        ranks.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return ranks


def wait_for_step(run: Path, step: int, ranks: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step and "loss" in line
                                    for line in metrics.read_text().splitlines()):
            return
        assert all(r.poll() is None for r in ranks), "a rank ended early: " + "".join(r.stderr.read() for r in ranks)
        time.sleep(0.2)
    pytest.fail(f"no step {step} within {timeout} s")


@pytest.mark.distributed
@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_a_lost_rank_stops_the_other_within_bounded_time_naming_it(tmp_path: Path, fault: str):
    ranks = start_two_ranks(tmp_path)
    try:
        wait_for_step(tmp_path / "run", 2, ranks)
        # SIGKILL: gloo fails the next collective at once; SIGSTOP: the peer is alive but silent,
        # as with a hung node under NCCL, and only the heartbeat notices.
        os.kill(ranks[1].pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        lost_at = time.monotonic()
        _, err = ranks[0].communicate(timeout=120)
        waited = time.monotonic() - lost_at
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
            process.communicate()
    # One code whichever path noticed (the watchdog, or a failed collective: that one gave 1).
    assert ranks[0].returncode == EXIT_RANK_LOST, err[-2000:]
    assert "rank 1 (" in err and f"pid {ranks[1].pid}" in err, err[-2000:]
    assert "Traceback" not in err and "frame #" not in err, err[-2000:]
    assert waited < 60, f"rank 0 needed {waited:.0f} s to leave"  # heartbeat limit 6 s, plus start-up slack


def test_the_watchdog_names_a_lost_node_as_one_with_its_ranks():
    """Ranks 2 and 3 share a host and fall silent together, crossing the limit a beat apart: one
    notice names both, grouped by host, and not rank 1, which still beats."""
    store = torch.distributed.HashStore()
    dog = watchdog.Watchdog(store, rank=0, world_size=4, interval_s=0.1, timeout_s=1.0)
    for rank, who in ((1, "gpu01, pid 11"), (2, "gpu02, pid 12"), (3, "gpu02, pid 13")):
        dog.store.set(f"who/{rank}", who)
    assert dog._silent_ranks(now=0.0) == []  # first sight of every counter
    for rank in (1, 3):
        dog.store.add(f"beat/{rank}", 1)
    assert dog._silent_ranks(now=0.3) == []
    dog.store.add("beat/1", 1)
    silent = dog._silent_ranks(now=1.1)  # rank 2 past the limit, rank 3 eight beats late
    assert silent == [2, 3]
    assert dog.describe_all(silent) == "ranks 2, 3 (gpu02, pids 12, 13)"
    assert dog.describe_all([1, 2]) == "rank 1 (gpu01, pid 11), rank 2 (gpu02, pid 12)"


STORE_HOST = """
import sys, time, datetime, os
import torch.distributed as dist
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), 2, True, datetime.timedelta(seconds=60), wait_for_workers=False)
beats = dist.PrefixStore("bigssl/watchdog/", store)
beats.set("who/0", f"storehost, pid {os.getpid()}")
while True:  # rank 0's heartbeat
    beats.add("beat/0", 1)
    time.sleep(0.1)
"""

WATCHER = """
import sys, time, datetime
import torch.distributed as dist
from bigssl.distributed import watchdog
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), 2, False, datetime.timedelta(seconds=60))
watchdog.start(store, rank=1, world_size=2, interval_s=0.2, timeout_s=2.0)
print("watching", flush=True)
time.sleep(120)
"""


@pytest.mark.distributed
def test_a_frozen_store_host_stops_the_other_ranks_within_bounded_time():
    """Rank 0's node goes silent (here: its process frozen) and a store call never returns
    (TCPStore's add waits in a recv with no timeout): the guard thread still ends the rank."""
    port = str(free_port())
    host = subprocess.Popen([sys.executable, "-c", STORE_HOST, port], cwd=REPO, env=worker_env())
    watcher = subprocess.Popen([sys.executable, "-c", WATCHER, port], cwd=REPO, env=worker_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout.readline().strip() == "watching", watcher.stderr.read()
        time.sleep(1.0)  # a few rounds: rank 0's name is known
        host.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        _, err = watcher.communicate(timeout=60)
        waited = time.monotonic() - frozen_at
    finally:
        for process in (watcher, host):
            if process.poll() is None:
                process.kill()
            process.wait()
    assert watcher.returncode == watchdog.EXIT_CODE, err
    assert f"rank 0 (storehost, pid {host.pid}), which hosts the rendezvous store, has not answered" in err, err
    assert waited < 10, f"{waited:.1f} s"  # limit 2 s, plus a heartbeat interval and start-up slack


# ------------------------------------------------------------------------- corrupt checkpoint
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path):
    run = tmp_path / "run"
    args = ["train", str(QUICKSTART), *TINY, f"log.dir={run}", "checkpoint.every_steps=2", "checkpoint.keep=2"]
    first = subprocess.run([sys.executable, "-m", "bigssl", *args, "optim.max_steps=4"], cwd=REPO, env=worker_env(),
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    newest = run / "checkpoints" / "step_00000004" / "state.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern in the middle: still a loadable size
    newest.write_bytes(bytes(data))
    second = subprocess.run([sys.executable, "-m", "bigssl", *args, "optim.max_steps=6"], cwd=REPO,
                            env=worker_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "step_00000004 is corrupt (state.pt: sha256 mismatch)" in second.stderr
    assert "resumed from" in second.stderr and "step_00000002 (step 2)" in second.stderr
    assert (run / "checkpoints" / "step_00000004.corrupt" / "state.pt").exists()  # set aside, not deleted
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in line]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3-4 retrained, logged once


def test_diverging_before_the_first_checkpoint_says_there_is_none(tmp_path: Path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method:\n  name: test_nan_at\n")
    # It said "The last checkpoint, None, is kept".
    with pytest.raises(TrainingDiverged, match=r"\(steps 1-1\); stopped\. No checkpoint was written yet \(a rerun "
                                               r"starts from step 0\); lower optim.base_lr"):
        train(recipes.load(recipe, nan_overrides(tmp_path, [0], limit=1)))
    assert not (tmp_path / "run" / "checkpoints").exists()
