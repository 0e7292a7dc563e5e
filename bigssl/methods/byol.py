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

import copy

import torch

from bigssl import losses
from bigssl.config import Config
from bigssl.methods.base import Batch, Method, register
from bigssl.methods.configs import BYOLConfig
from bigssl.models.backbones import build_backbone, feature_dim
from bigssl.models.heads import mlp, projector
from bigssl.schedules import cosine_to


@register("byol")
class BYOL(Method):
    config_class = BYOLConfig

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        method: BYOLConfig = config.method  # type: ignore[assignment]
        self.backbone = build_backbone(config.model)
        self.projector = projector(feature_dim(self.backbone), config.model.projector)
        out = config.model.projector.out_dim
        self.predictor = mlp(out, method.predictor_hidden_dim, out, layers=2, batch_norm=True, last_batch_norm=False)
        self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def training_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        views = batch["views"][0]  # [2, B, C, H, W]
        features = [self.backbone(views[v]) for v in range(2)]
        predictions = [self.predictor(self.projector(h)) for h in features]
        with torch.no_grad():
            targets = [self.target_projector(self.target_backbone(views[v])) for v in range(2)]
        loss = losses.normalized_mse(predictions[0], targets[1]) + losses.normalized_mse(predictions[1], targets[0])
        return {"loss": loss, "features": features[0], "embedding": targets[0]}

    def ema_pairs(self):
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    def ema_momentum(self, step: int) -> float:
        return cosine_to(self.config.method.momentum, 1.0, step, self.total_steps)
