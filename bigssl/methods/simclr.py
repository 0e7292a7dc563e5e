"""SimCLR (Chen, Kornblith, Norouzi, Hinton 2020, arXiv 2002.05709).

Two augmented views of each image go through one backbone and an MLP projector; NT-Xent pulls
the two projections of an image together against the 2(N−1) other views of the global batch.
Negatives are gathered from every rank with gradient (bigssl.losses.nt_xent). With more views
of each image (`data.views.views`, and any local crops) every other view of an image is a
positive (bigssl.losses.multiview_nt_xent), which is NT-Xent itself for two.
"""

from __future__ import annotations

import torch

from bigssl import losses
from bigssl.methods.base import Batch, Method, StepOutput, flat, register
from bigssl.methods.configs import SimCLRConfig
from bigssl.models.backbones import build_backbone, feature_dim
from bigssl.models.heads import projector


@register("simclr")
class SimCLR(Method):
    config_class = SimCLRConfig
    config: SimCLRConfig

    def build(self) -> None:
        self.backbone = build_backbone(self.model_config)
        self.projector = projector(feature_dim(self.backbone), self.model_config.projector)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        # One pass per resolution over all its views (view-major): BN sees V·B samples, as in the
        # official code for V = 2.
        features = None
        projections: list[torch.Tensor] = []
        for group in batch["views"]:
            h = self.backbone(flat(group))
            features = h[: group.shape[1]] if features is None else features
            projections.extend(self.projector(h).chunk(group.shape[0]))
        method = self.config
        if len(projections) == 2:
            loss = losses.nt_xent(*projections, method.temperature, gather=method.gather)
        else:  # more views of each image: every other view is a positive
            loss = losses.multiview_nt_xent(projections, method.temperature, gather=method.gather)
        return StepOutput(loss, features, projections[0].detach(),
                          metrics={"temperature": loss.new_tensor(method.temperature)})
