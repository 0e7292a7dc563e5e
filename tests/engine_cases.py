"""Shared pieces of the engine tests: a tiny ViT config, a tiny EMA-teacher method, rank batches,
and a loop that trains a few steps through any engine and records what happened."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bigssl import recipes
from bigssl.config import Config, MethodConfig
from bigssl.distributed.engines import build_engine
from bigssl.distributed.env import DistEnv
from bigssl.methods.base import Method, StepOutput, build, register
from bigssl.methods.context import RunContext
from bigssl.methods.teacher import EMATeacher
from bigssl.models.backbones import build_backbone, feature_dim
from bigssl.models.heads import projector
from bigssl.optim import build_optimizer

BATCH, SIDE = 4, 32  # per rank
TINY_VIT = ["model.backbone=vit_tiny_patch16_224", "model.channels_last=false",
            "model.backbone_args={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
            "model.projector.hidden_dim=32", "model.projector.out_dim=16", "optim.name=sgd", "optim.lr=0.05",
            "optim.weight_decay=0.05", "optim.clip_grad=1.0"]


@dataclass
class TinyEMAConfig(MethodConfig):
    name: str = "test_tiny_ema"
    momentum: float = 0.9


@register("test_tiny_ema")
class TinyEMA(Method):
    """BYOL-shaped: online backbone + projector + predictor, an EMA teacher of backbone + projector."""

    config_class = TinyEMAConfig
    config: TinyEMAConfig

    def build(self) -> None:
        self.backbone = build_backbone(self.model_config)
        self.projector = projector(feature_dim(self.backbone), self.model_config.projector)
        out = self.model_config.projector.out_dim
        self.predictor = nn.Sequential(nn.Linear(out, out), nn.ReLU(), nn.Linear(out, out))
        self.teacher = EMATeacher(self.config.momentum)
        self.teacher_backbone = self.teacher.copy(self.backbone)
        self.teacher_projector = self.teacher.copy(self.projector)

    def training_step(self, batch, step):
        views = batch["views"][0]
        online = self.predictor(self.projector(self.backbone(views.flatten(0, 1))))
        with torch.no_grad():
            target = self.teacher_projector(self.teacher_backbone(views.flip(0).flatten(0, 1)))
        return StepOutput((2 - 2 * F.cosine_similarity(online, target, dim=-1)).mean())


NO_BN = "model.projector.batch_norm=false"
ENGINES = {"fsdp": ["engine.kind=fsdp"], **{f"zero{s}": ["engine.kind=deepspeed", f"engine.zero_stage={s}"]
                                             for s in (1, 2, 3)}}


def engine_keys(engine: str) -> list[str]:
    """The config keys of an engine name: ddp, fsdp, zero1, zero2 or zero3."""
    return ENGINES.get(engine, [f"engine.kind={engine}"])


def make_config(method: str, *extra: str) -> Config:
    """`extra`: engine keys and other overrides; an engine kind alone may be given bare."""
    extra = tuple(e if "=" in e else f"engine.kind={e}" for e in extra)
    return recipes.load(None, [f"method.name={method}", *TINY_VIT, f"optim.batch_size={2 * BATCH}", *extra])


def rank_batch(rank: int, step: int) -> dict:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return {"views": [torch.rand((2, BATCH, 3, SIDE, SIDE), generator=generator)]}


def global_batch(world_size: int, step: int) -> dict:
    """What `world_size` ranks see at `step`, as one process's batch (ranks in order)."""
    parts = [rank_batch(r, step)["views"][0] for r in range(world_size)]
    return {"views": [torch.cat(parts, dim=1)]}


def setup(config: Config, rank: int, world_size: int, data_size: int | None = None, env: DistEnv | None = None,
          steps_per_epoch: int = 1, total_steps: int = 1):
    """`env`: where the rank really is (a launched job); by default one host, local rank = rank.
    `data_size`, `steps_per_epoch`, `total_steps`: what the method is told of the run."""
    env = env or DistEnv(rank=rank, world_size=world_size, local_rank=rank)
    torch.manual_seed(0)
    method = build(config, RunContext.of(config, world_size=world_size, steps_per_epoch=steps_per_epoch,
                                         total_steps=total_steps, num_samples=data_size))
    engine = build_engine(config, env, torch.device("cpu"))
    engine.setup(method, lambda module: build_optimizer(module, config.optim, rules=method.param_rules()))
    return engine


def train_steps(engine, steps: range, batch_for, track_ema: bool = False) -> dict:
    """Run `steps`; returns losses, and with `track_ema` a full-tensor EMA of the student
    computed here from whole parameters, to compare with the engine's (sharded) teacher."""
    method = engine.method
    reference = [full(p) for _, t in method.ema_pairs() for p in t.parameters()] if track_ema else []
    losses = []
    for step in steps:
        out = engine.forward(batch_for(step), step)
        engine.backward(out.loss)
        engine.step()
        if pairs := method.ema_pairs():
            momentum = method.ema_momentum(step)
            engine.ema_update(pairs, momentum)
            if track_ema:
                students = [full(p) for s, _ in pairs for p in s.parameters()]
                reference = [momentum * r + (1 - momentum) * s for r, s in zip(reference, students, strict=True)]
        losses.append(out.loss.item())
    result = {"losses": losses}
    if track_ema:
        result["reference"] = reference
        result["teacher"] = [full(p) for _, t in method.ema_pairs() for p in t.parameters()]
    return result


# Two engines (or 2 ranks and 1 process) round float32 differently: bucketed vs per-tensor
# reductions, sharded norms, thread counts, SIMD width. The difference enters the weights at every
# update and grows with the updates taken, so the tolerance does too. Measured on the 2-rank vs
# 1-process curves here: ≤ 1.3e-7 after 4 updates, while a clip norm off by √2 (a per-shard norm)
# moves them by ≥ 3e-4 from the first update on.
LOSS_RTOL_PER_STEP = 1e-5


def assert_same_loss_curve(actual: list[float], expected: list[float], first_step: int = 0,
                           rtol_per_step: float = LOSS_RTOL_PER_STEP) -> None:
    """`actual[i]` is the loss after `first_step + i` updates: equal to `expected[i]` within
    `rtol_per_step` per update taken (and one more: the forward alone rounds differently)."""
    assert len(actual) == len(expected) > 0
    for i, (got, want) in enumerate(zip(actual, expected, strict=True)):
        rtol = rtol_per_step * (first_step + i + 1)
        assert got == pytest.approx(want, rel=rtol, abs=0), f"loss after {first_step + i} updates: {got} vs {want}"


def full(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter on every rank (a collective for sharded layouts)."""
    from torch.distributed.tensor import DTensor

    if hasattr(param, "ds_tensor"):  # ZeRO-3
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone()
    return (param.full_tensor() if isinstance(param, DTensor) else param).detach().clone()


def save_result(path: Path, rank: int, result: dict) -> None:
    torch.save(result, path / f"rank{rank}.pt")
