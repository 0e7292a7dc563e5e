"""BYOL (Grill et al. 2020, arXiv 2006.07733).

An online network (backbone → projector → predictor) predicts, for each view, the projection a
slowly moving EMA target network makes of the other view: ‖p̄ − z̄′‖² = 2 − 2cos, symmetrised.
No negatives; the predictor and the EMA target (τ 0.996 → 1, cosine over training) prevent
collapse. Each view goes through the networks on its own, so BN statistics are per view, as in
the official code.

Momentum index: the official update (deepmind-research byol/byol_experiment.py:335-343) applies
the optimizer step of global step t (counted from 0, main_loop.py:62-92), then moves the target
with τ(t) towards the new online weights: `ema_momentum(t)` is τ(t), which the trainer applies
after optimizer step t. The official target starts from its own random draw
(byol_experiment.py:373-385; its comment saw "no significant difference"); here it starts as a
copy of the online network.
"""

from __future__ import annotations

import torch

from bigssl import losses
from bigssl.methods.base import Batch, Method, StepOutput, register
from bigssl.methods.configs import BYOLConfig
from bigssl.methods.teacher import EMATeacher
from bigssl.models.backbones import build_backbone, feature_dim
from bigssl.models.heads import mlp, projector


@register("byol")
class BYOL(Method):
    config_class = BYOLConfig
    config: BYOLConfig

    def build(self) -> None:
        self.backbone = build_backbone(self.model_config)
        self.projector = projector(feature_dim(self.backbone), self.model_config.projector)
        out = self.model_config.projector.out_dim
        self.predictor = mlp(out, self.config.predictor_hidden_dim, out, layers=2, batch_norm=True,
                             last_batch_norm=False)
        self.teacher = EMATeacher(self.config.momentum, final=1.0, total_steps=self.run.total_steps)  # τ(t)
        self.target_backbone = self.teacher.copy(self.backbone)
        self.target_projector = self.teacher.copy(self.projector)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        views = batch["views"][0]  # [2, B, C, H, W]
        features = [self.backbone(views[v]) for v in range(2)]
        predictions = [self.predictor(self.projector(h)) for h in features]
        with torch.no_grad():
            targets = [self.target_projector(self.target_backbone(views[v])) for v in range(2)]
        loss = losses.normalized_mse(predictions[0], targets[1]) + losses.normalized_mse(predictions[1], targets[0])
        return StepOutput(loss, features[0], targets[0])
