"""A training run stopped mid-epoch in exact mode resumes with the samples it has not seen and,
with the same ranks, workers and batch sizes, replays exactly the batches and views an
uninterrupted run would have trained on."""

from __future__ import annotations

import io
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import make_shards, pattern
from helpers import run_distributed
from PIL import Image
from torch import nn

from bigssl import recipes
from bigssl.config import MethodConfig
from bigssl.data.write import Sample, write_shards
from bigssl.distributed import comm
from bigssl.methods.base import Method, StepOutput, register
from bigssl.preemption import Stopped
from bigssl.train import train

SAMPLES, PER_SHARD, BATCH = 230, 23, 16


@dataclass
class IdRecorderConfig(MethodConfig):
    name: str = "test_id_recorder"
    out: str = ""
    signal_at_step: int = -1  # rank 0 sends itself SIGUSR1 during this step (a preemption notice)
    signal_when_built: bool = False  # ... or while the trainer is still starting up


@register("test_id_recorder")
class IdRecorder(Method):
    """Writes the global ids of every batch it trains on; learns nothing useful."""

    config_class = IdRecorderConfig
    config: IdRecorderConfig

    def build(self) -> None:
        self.backbone = nn.Linear(3, 2)
        if self.config.signal_when_built:
            os.kill(os.getpid(), signal.SIGUSR1)

    def training_step(self, batch, step):
        if step == self.config.signal_at_step and comm.rank() == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        # The ids, then the exact pixels of every view after the photometric half (float64 sums
        # per sample, printed in full), so two runs compare view for view.
        pixels = [f"{v:.17g}" for v in batch["views"][0].double().sum(dim=(0, 2, 3, 4)).tolist()]
        with open(self.config.out.format(rank=comm.rank()), "a") as handle:
            handle.write(" ".join(str(i) for i in batch["id"].tolist()) + " | " + " ".join(pixels) + "\n")
        pooled = batch["views"][0].mean(dim=(0, 3, 4))  # [V, B, C, S, S] → [B, C]
        return StepOutput(self.backbone(pooled).pow(2).mean(), metrics={"pooled_mean": pooled.mean()})


def recorded(path: Path) -> list[list[int]]:
    return [[int(i) for i in line.split(" | ")[0].split()] for line in path.read_text().splitlines()]


def test_exact_epoch_resumes_where_it_stopped(tmp_path: Path):
    shards = make_shards(tmp_path / "ds", SAMPLES, PER_SHARD)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method:\n  name: test_id_recorder\n")
    ids_file = tmp_path / "ids.txt"
    overrides = [f"data.train={pattern(shards, SAMPLES // PER_SHARD)}", "data.val=", "data.mode=exact",
                 "data.workers=2", "data.views.size=8", "data.shuffle_buffer=20", f"optim.batch_size={BATCH}",
                 "optim.epochs=1", "optim.name=sgd", "model.channels_last=false", f"log.dir={tmp_path / 'run'}",
                 "checkpoint.every_steps=0", "log.tensorboard=false", "log.progress=false",
                 f"method.out={ids_file}"]

    train(recipes.load(recipe, [*overrides, "optim.max_steps=5"]))  # stops mid-epoch, checkpoints step 5
    first = recorded(ids_file)
    assert len(first) == 5 and all(len(batch) == BATCH for batch in first)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step_00000005" / "state.pt", weights_only=True)
    position = saved["extra"]["consumed"]
    consumed_ids = {s * PER_SHARD + o for s, end in zip(position["prefix_shards"], position["prefix_ends"], strict=True)
                    for o in range(end)}
    consumed_ids |= {s * PER_SHARD + o for s, o in zip(position["beyond_shards"], position["beyond_ordinals"],
                                                       strict=True)}
    assert consumed_ids == {i for batch in first for i in batch}  # the position is what was trained on

    train(recipes.load(recipe, overrides))  # same log.dir: resumes at step 5 and finishes the epoch
    everything = [i for batch in recorded(ids_file) for i in batch]
    assert len(everything) == (SAMPLES // BATCH) * BATCH  # 14 steps; the 6-sample tail fills no step
    assert len(set(everything)) == len(everything)  # none twice
    assert set(everything) <= set(range(SAMPLES))


BAD = {7, 40, 41, 95, 150}  # undecodable samples, skipped (and counted) wherever they fall


def textured_shards(directory: Path) -> str:
    """Noise images (a crop's pixels depend on where it falls), with a few undecodable samples."""
    rng = np.random.default_rng(0)

    def png(i: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    samples = [Sample(b"not an image" if i in BAD else png(i), "png", i % 3) for i in range(SAMPLES)]
    write_shards(iter(samples), directory, classes=["a", "b", "c"], maxcount=PER_SHARD)
    return pattern(directory, SAMPLES // PER_SHARD)


def replay_overrides(data: str, run: Path, ids: str, world_size: int) -> list[str]:
    return [f"data.train={data}", "data.val=", "data.mode=exact", "data.workers=2", "data.views.size=8",
            "data.views.resize=8", "data.shuffle_buffer=20", "data.micro_batch=5",
            f"optim.batch_size={BATCH * world_size}", "optim.epochs=2", "optim.name=sgd", "optim.base_lr=0.5",
            "model.channels_last=false", f"log.dir={run}", "checkpoint.every_steps=0", "log.tensorboard=false",
            "log.progress=false", "log.every_steps=3", f"method.out={ids}"]


def _train_or_stop(recipe: Path, overrides: list[str], stops: bool) -> None:
    try:
        train(recipes.load(recipe, overrides))
        assert not stops, "the run was expected to stop on its signal"
    except Stopped:
        assert stops, "the run stopped without a signal"


def _train_in_rank(rank: int, world_size: int, recipe: Path, overrides: list[str], stops: bool) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size)})  # the group is up already
    _train_or_stop(recipe, overrides, stops)


def _train(world_size: int, recipe: Path, overrides: list[str], stops: bool = False) -> None:
    if world_size == 1:
        _train_or_stop(recipe, overrides, stops)
    else:
        run_distributed(_train_in_rank, world_size, recipe, overrides, stops)


def _logged(run: Path) -> list[dict]:
    keep = ("step", "loss", "pooled_mean", "epoch", "lr", "grad_norm")
    return [{k: r[k] for k in keep} for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in (r := json.loads(line))]


@pytest.mark.parametrize("world_size", [1, pytest.param(2, marks=pytest.mark.distributed)])
def test_resumed_epoch_replays_the_uninterrupted_batches_and_views(tmp_path: Path, world_size: int):
    data = textured_shards(tmp_path / "ds")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method:\n  name: test_id_recorder\n")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _train(world_size, recipe, replay_overrides(data, whole, str(tmp_path / "whole-{rank}.txt"), world_size))
    cut_args = replay_overrides(data, cut, str(tmp_path / "cut-{rank}.txt"), world_size)
    # SIGUSR1 to rank 0 during step index 4: every rank stops after step 5 (mid-epoch, mid-log-window).
    _train(world_size, recipe, [*cut_args, "method.signal_at_step=4"], stops=True)
    saved = sorted(p.name for p in (cut / "checkpoints").iterdir())
    assert saved == ["step_00000005"], saved
    _train(world_size, recipe, cut_args)  # resumes at step 5, replays the rest of epoch 0, then epoch 1
    for rank in range(world_size):
        uninterrupted = (tmp_path / f"whole-{rank}.txt").read_text().splitlines()
        resumed = (tmp_path / f"cut-{rank}.txt").read_text().splitlines()
        assert len(uninterrupted) == 2 * (SAMPLES - len(BAD)) // (BATCH * world_size)
        assert resumed == uninterrupted  # same samples in the same batches, same crops, same colours
    # The log window open at step 5 is carried over: every logged mean (and lr, grad norm) matches.
    assert _logged(cut) == _logged(whole)
    final = [torch.load(max((run / "checkpoints").glob("step_*")) / "state.pt", weights_only=True)
             for run in (whole, cut)]
    assert final[0]["extra"]["step"] == final[1]["extra"]["step"] == len(uninterrupted)
    weights = [state["method"] for state in final]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # bit for bit


def test_a_stop_signal_during_start_up_stops_after_the_first_step(tmp_path: Path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method:\n  name: test_id_recorder\n")
    run = tmp_path / "run"
    overrides = replay_overrides(textured_shards(tmp_path / "ds"), run, str(tmp_path / "ids-{rank}.txt"), 1)
    with pytest.raises(Stopped, match="SIGUSR1 received: stopped after step 1"):
        train(recipes.load(recipe, [*overrides, "method.signal_when_built=true"]))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001"]
