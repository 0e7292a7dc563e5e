"""Small recipes for the planner's exactness tests: every kind of collective a method makes
(gathered negatives, global BatchNorm, centre, shuffle-BN and queue, Sinkhorn, memory bank,
differentiable cross-correlation), on widths that 2 and 4 ranks do not divide (FSDP2 pads).
Two cases step with LARS, whose trust ratios take collectives under the sharding engines (ZeRO's
partial-norm all-reduce per partition, DTensor's norm reductions under FSDP2): SimCLR with rule
lars (biases and norms not adapted, one adapting group), DINO with rule larc and every tensor
adapted (SwAV's recipe; two adapting groups: the head's last layer has its own)."""

from __future__ import annotations

import torch

from bigssl import recipes
from bigssl.config import Config

GLOBAL_BATCH = 8  # 4 per rank at 2 ranks, 2 at 4
SAMPLES = 64  # dataset size: the memory bank's rows; steps_per_epoch = SAMPLES // GLOBAL_BATCH
COUNTED_STEP = 2  # steps 0 and 1 warm every lazy buffer (DDP rebuilds its buckets after step 0)

TINY_VIT = ["model.backbone=vit_tiny_patch16_224", "model.channels_last=false",
            "model.backbone_args={img_size: 32, patch_size: 8, embed_dim: 30, depth: 2, num_heads: 3}"]
TINY_RESNET = ["model.backbone=resnet18", "model.backbone_args={channels: [6, 10, 14, 18]}", "model.small_stem=true"]
COMMON = ["data.views.size=32", "model.projector.hidden_dim=22", "model.projector.out_dim=10", "optim.name=adamw",
          "optim.lr=0.001", "optim.clip_grad=1.0", f"optim.batch_size={GLOBAL_BATCH}"]

CASES: dict[str, list[str]] = {
    "simclr_vit_sync_bn": ["method.name=simclr", *TINY_VIT, "engine.sync_bn=true", "optim.name=lars"],
    "dino_resnet": ["method.name=dino", *TINY_RESNET, "data.views.policy=dino", "data.views.local_crops=2",
                    "data.views.local_size=16", "method.out_dim=50", "method.hidden_dim=24",
                    "method.bottleneck_dim=12", "method.freeze_last_layer_epochs=0", "optim.clip_grad=0.0",
                    "optim.clip_grad_per_parameter=true", "method.teacher_temp_warmup_epochs=0", "optim.name=lars",
                    "optim.lars_rule=larc", "optim.exclude_bias_norm=false"],
    "mocov2_resnet": ["method.name=moco", *TINY_RESNET, "data.views.policy=mocov2", "method.queue_size=64"],
    "swav_resnet": ["method.name=swav", *TINY_RESNET, "data.views.policy=swav", "data.views.local_crops=2",
                    "data.views.local_size=16", "method.prototypes=30", "method.freeze_prototypes_epochs=0"],
    "instdisc_resnet": ["method.name=instdisc", *TINY_RESNET, "data.views.policy=instdisc", "method.negatives=16"],
    "barlow_vit": ["method.name=barlow", *TINY_VIT],
}
# Every case at 2 ranks; at 4 (four processes on CI's two cores: 2 minutes for more), those where
# the world size changes most: FSDP2's padding and the teacher's prefetch, shuffle-BN, ZeRO-3.
ENGINE_CASES = {2: {"ddp": list(CASES), "fsdp": list(CASES), "zero1": ["simclr_vit_sync_bn", "dino_resnet"],
                    "zero2": ["simclr_vit_sync_bn", "dino_resnet"], "zero3": ["simclr_vit_sync_bn", "dino_resnet"]},
                4: {"ddp": ["simclr_vit_sync_bn", "mocov2_resnet"], "fsdp": ["simclr_vit_sync_bn", "dino_resnet"],
                    "zero3": ["dino_resnet"]}}


def case_config(case: str, engine: str) -> Config:
    from bigssl.plan.engines import OVERRIDES

    # DeepSpeed clips only the global norm (its engine refuses per-parameter clipping).
    zero = ["optim.clip_grad_per_parameter=false", "optim.clip_grad=1.0"] if engine.startswith("zero") else []
    return recipes.load(None, [*COMMON, *CASES[case], *OVERRIDES[engine], *zero])


def rank_batch(config: Config, rank: int, local_batch: int, step: int) -> dict:
    """Random views of the policy's shapes; global sample ids rank-major, as the stream numbers them."""
    from bigssl.plan.trace import view_shapes

    generator = torch.Generator().manual_seed(1000 * step + rank)
    views = [torch.rand((v, local_batch, c, h, w), generator=generator) for v, c, h, w in view_shapes(config)]
    return {"views": views, "label": torch.zeros(local_batch, dtype=torch.long),
            "id": torch.arange(local_batch) + rank * local_batch}
