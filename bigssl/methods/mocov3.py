"""MoCo v3 (Chen, Xie, He 2021, arXiv 2104.02057).

A query network (backbone → projector → predictor) and a momentum network (backbone →
projector, EMA m 0.99 → 1 cosine). Symmetric InfoNCE over in-batch keys gathered from every
rank without gradient, scaled by 2τ: L = ctr(q1, k2) + ctr(q2, k1). Each crop goes through the
networks on its own (BN per crop, as in the official code). For ViTs: the random patch
projection is frozen (the paper's fix for its training instability) and the position
embedding is the fixed 2-D sin-cos one; the projector and predictor end in BN without affine.
"""

from __future__ import annotations

import copy
import math

import torch
from timm.layers import build_sincos2d_pos_embed
from torch import nn

from bigssl import losses
from bigssl.config import Config
from bigssl.methods.base import Batch, Method, register
from bigssl.methods.configs import MoCoV3Config
from bigssl.models.backbones import build_backbone, feature_dim
from bigssl.models.heads import mlp, projector
from bigssl.schedules import cosine_to


@torch.no_grad()
def _mocov3_vit(backbone: nn.Module, config: MoCoV3Config) -> None:
    """The ViT changes of MoCo v3's vits.py, applied to a timm ViT."""
    if config.sincos_pos_embed and getattr(backbone, "pos_embed", None) is not None:
        grid = backbone.patch_embed.grid_size
        prefix = backbone.pos_embed.shape[1] - grid[0] * grid[1]
        table = build_sincos2d_pos_embed(list(grid), dim=backbone.pos_embed.shape[-1])
        backbone.pos_embed[:, prefix:] = table.reshape(1, -1, table.shape[-1])
        backbone.pos_embed[:, :prefix] = 0
        backbone.pos_embed.requires_grad_(False)
    if config.frozen_patch_embed:
        proj = backbone.patch_embed.proj
        fan = proj.weight.shape[1] * math.prod(proj.weight.shape[2:]) + proj.weight.shape[0]
        bound = math.sqrt(6.0 / fan)  # Xavier-uniform with the flattened patch as fan-in
        proj.weight.uniform_(-bound, bound)
        proj.bias.zero_()
        proj.requires_grad_(False)


@register("mocov3")
class MoCoV3(Method):
    config_class = MoCoV3Config

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        method: MoCoV3Config = config.method  # type: ignore[assignment]
        self.backbone = build_backbone(config.model)
        vit = hasattr(self.backbone, "patch_embed")
        if vit:
            _mocov3_vit(self.backbone, method)
        self.projector = projector(feature_dim(self.backbone), config.model.projector)
        out = config.model.projector.out_dim
        # The ViT predictor ends in BN without affine, the ResNet one in a plain Linear.
        self.predictor = mlp(out, method.predictor_hidden_dim, out, layers=2, batch_norm=True, last_batch_norm=vit,
                             last_affine=False)
        self.momentum_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def training_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        tau = self.config.method.temperature
        views = batch["views"][0]
        features = [self.backbone(views[v]) for v in range(2)]
        queries = [self.predictor(self.projector(h)) for h in features]
        with torch.no_grad():
            keys = [self.momentum_projector(self.momentum_backbone(views[v])) for v in range(2)]
        loss = 2 * tau * (losses.info_nce(queries[0], keys[1], tau) + losses.info_nce(queries[1], keys[0], tau))
        return {"loss": loss, "features": features[0], "embedding": keys[0],
                "temperature": loss.new_tensor(tau)}

    def ema_pairs(self):
        return [(self.backbone, self.momentum_backbone), (self.projector, self.momentum_projector)]

    def ema_momentum(self, step: int) -> float:
        return cosine_to(self.config.method.momentum, 1.0, step, self.total_steps)
