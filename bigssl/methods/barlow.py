"""Barlow Twins (Zbontar et al. 2021, arXiv 2103.03230).

The cross-correlation of the two views' embeddings, standardised along the global batch, is
pushed to the identity: Σ(1 − C_ii)² + λ Σ_{i≠j} C_ij², λ = 0.0051 (the official code's value).
C is reduced over ranks with gradient, so W ranks give the single-process gradient;
`differentiable_reduce: false` is the official all_reduce without gradient (each parameter
gradient 1/W of that), which the published recipe's lr was tuned with. The official recipe's
lower lr for biases and BN parameters is `optim.no_decay_lr_scale` (0.0048 / 0.2 = 0.024).
"""

from __future__ import annotations

from bigssl import losses
from bigssl.methods.base import Batch, Method, StepOutput, register
from bigssl.methods.configs import BarlowConfig
from bigssl.models.backbones import build_backbone, feature_dim
from bigssl.models.heads import projector


@register("barlow")
class BarlowTwins(Method):
    config_class = BarlowConfig
    config: BarlowConfig

    def build(self) -> None:
        self.backbone = build_backbone(self.model_config)
        self.projector = projector(feature_dim(self.backbone), self.model_config.projector)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        method = self.config
        views = batch["views"][0]
        features = [self.backbone(views[v]) for v in range(2)]
        z1, z2 = (self.projector(h) for h in features)
        loss = losses.barlow_twins_loss(z1, z2, method.lambd, differentiable_reduce=method.differentiable_reduce)
        return StepOutput(loss, features[0], z1.detach())
