"""SimSiam (Chen & He 2020, arXiv 2011.10566).

One network, two views: the predictor's output for each view is pulled towards the other view's
projection under a stop-gradient, D(p, sg(z)) = −cos, symmetrised and halved. The predictor is
a bottleneck (2048 → 512 → 2048) with no BN on its output and keeps a fixed learning rate (the
paper's §4.2: a decaying predictor lr hurts); the projector ends in BN without affine
parameters, as in the official code. `engine.sync_bn: true` gives the paper's SyncBN.
"""

from __future__ import annotations

from bigssl import losses
from bigssl.methods.base import Batch, Method, StepOutput, register
from bigssl.methods.configs import SimSiamConfig
from bigssl.models.backbones import build_backbone, feature_dim
from bigssl.models.heads import mlp, projector
from bigssl.optim import ParamRule


@register("simsiam")
class SimSiam(Method):
    config_class = SimSiamConfig
    config: SimSiamConfig

    def build(self) -> None:
        self.backbone = build_backbone(self.model_config)
        self.projector = projector(feature_dim(self.backbone), self.model_config.projector)
        out = self.model_config.projector.out_dim
        self.predictor = mlp(out, self.config.predictor_hidden_dim, out, layers=2, batch_norm=True,
                             last_batch_norm=False)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        views = batch["views"][0]
        features = [self.backbone(views[v]) for v in range(2)]
        z = [self.projector(h) for h in features]
        p = [self.predictor(x) for x in z]
        loss = 0.5 * (losses.negative_cosine(p[0], z[1].detach()) + losses.negative_cosine(p[1], z[0].detach()))
        return StepOutput(loss, features[0], z[0].detach())

    def param_rules(self) -> list[ParamRule]:
        return [ParamRule("predictor.", fixed_lr=True)] if self.config.fixed_predictor_lr else []
