"""InvaSpread (Ye, Zhang, Yuen, Chang 2019, arXiv 1904.03436).

Instance discrimination inside the batch, no memory bank: two augmented views of each image
go through one backbone and a linear layer to 128-d unit features; each feature should pick out
its image's other view among the 2N − 1 other features of the global batch (invariance) and
push every other image away (spreading): `bigssl.losses.invaspread_loss`, τ 0.1.
"""

from __future__ import annotations

from bigssl import losses
from bigssl.methods.base import Batch, Method, StepOutput, flat, register
from bigssl.methods.configs import InvaSpreadConfig
from bigssl.models.backbones import build_backbone, feature_dim
from bigssl.models.heads import projector


@register("invaspread")
class InvaSpread(Method):
    config_class = InvaSpreadConfig
    config: InvaSpreadConfig

    def build(self) -> None:
        self.backbone = build_backbone(self.model_config)
        self.projector = projector(feature_dim(self.backbone), self.model_config.projector)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        method = self.config
        h = self.backbone(flat(batch["views"][0]))  # both views in one pass, as the official code
        f, f_hat = self.projector(h).chunk(2)
        loss = losses.invaspread_loss(f, f_hat, method.temperature, gather=method.gather)
        return StepOutput(loss, h[: len(f)], f.detach(), metrics={"temperature": loss.new_tensor(method.temperature)})
