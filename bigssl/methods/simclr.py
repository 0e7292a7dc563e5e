"""SimCLR (Chen, Kornblith, Norouzi, Hinton 2020, arXiv 2002.05709).

Two augmented views of each image go through one backbone and an MLP projector; NT-Xent pulls
the two projections of an image together against the 2(N−1) other views of the global batch.
Negatives are gathered from every rank with gradient (bigssl.losses.nt_xent).
"""

from __future__ import annotations

import torch

from bigssl import losses
from bigssl.config import Config
from bigssl.data.views import flat
from bigssl.methods.base import Batch, Method, register
from bigssl.methods.configs import SimCLRConfig
from bigssl.models.backbones import build_backbone, feature_dim
from bigssl.models.heads import projector


@register("simclr")
class SimCLR(Method):
    config_class = SimCLRConfig

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.backbone = build_backbone(config.model)
        self.projector = projector(feature_dim(self.backbone), config.model.projector)

    def training_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        # One pass over both views (view-major): BN sees 2B samples, as in the official code.
        h = self.backbone(flat(batch["views"][0]))
        z1, z2 = self.projector(h).chunk(2)
        method: SimCLRConfig = self.config.method  # type: ignore[assignment]
        loss = losses.nt_xent(z1, z2, method.temperature, gather=method.gather)
        return {"loss": loss, "features": h[: len(z1)], "embedding": z1.detach(),
                "temperature": loss.new_tensor(method.temperature)}
