"""A training run stopped mid-epoch in exact mode resumes with the samples it has not seen."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import make_shards, pattern
from torch import nn

from bigssl import config as config_lib
from bigssl.config import MethodConfig
from bigssl.methods.base import Method, register
from bigssl.train import train

SAMPLES, PER_SHARD, BATCH = 230, 23, 16


@dataclass
class IdRecorderConfig(MethodConfig):
    name: str = "test_id_recorder"
    out: str = ""


@register("test_id_recorder")
class IdRecorder(Method):
    """Writes the global ids of every batch it trains on; learns nothing useful."""

    config_class = IdRecorderConfig

    def __init__(self, config) -> None:
        super().__init__(config)
        self.backbone = nn.Linear(3, 2)

    def training_step(self, batch, step):
        with open(self.config.method.out, "a") as handle:
            handle.write(" ".join(str(i) for i in batch["id"].tolist()) + "\n")
        pooled = batch["views"][0].mean(dim=(0, 3, 4))  # [V, B, C, S, S] → [B, C]
        return {"loss": self.backbone(pooled).pow(2).mean()}


def recorded(path: Path) -> list[list[int]]:
    return [[int(i) for i in line.split()] for line in path.read_text().splitlines()]


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

    train(config_lib.load(recipe, [*overrides, "optim.max_steps=5"]))  # stops mid-epoch, checkpoints step 5
    first = recorded(ids_file)
    assert len(first) == 5 and all(len(batch) == BATCH for batch in first)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step_00000005" / "state.pt", weights_only=True)
    position = saved["extra"]["consumed"]
    consumed_ids = {s * PER_SHARD + o for s, end in zip(position["prefix_shards"], position["prefix_ends"], strict=True)
                    for o in range(end)}
    consumed_ids |= {s * PER_SHARD + o for s, o in zip(position["beyond_shards"], position["beyond_ordinals"],
                                                       strict=True)}
    assert consumed_ids == {i for batch in first for i in batch}  # the position is what was trained on

    train(config_lib.load(recipe, overrides))  # same log.dir: resumes at step 5 and finishes the epoch
    everything = [i for batch in recorded(ids_file) for i in batch]
    assert len(everything) == (SAMPLES // BATCH) * BATCH  # 14 steps; the 6-sample tail fills no step
    assert len(set(everything)) == len(everything)  # none twice
    assert set(everything) <= set(range(SAMPLES))
