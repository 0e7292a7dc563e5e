"""SwAV (Caron et al. 2020, arXiv 2006.09882).

Crops are scored against K learnable prototypes (unit vectors, 3000 on ImageNet); the codes of
each global crop, from a distributed Sinkhorn over the global batch (ε 0.05, 3 iterations, no
gradient), are predicted from every other crop: swapped prediction with multi-crop. As in the
official code (main_swav.py), the stored prototype rows are rescaled to unit norm before every
forward (`unit_norm_rows`: the engine does it wherever it keeps them, ZeRO's master copies
included), the forward uses them as they are, and they are left out of the optimizer for the
first epoch (no update, no momentum). A queue of past global-crop embeddings (per rank, `queue_length` over all
ranks) joins the Sinkhorn from `queue_start_epoch`, for small batches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bigssl import health, losses
from bigssl.errors import ConfigError
from bigssl.methods.base import Batch, Method, StepOutput, flat, register
from bigssl.methods.configs import SwAVConfig
from bigssl.models.backbones import build_backbone, feature_dim
from bigssl.models.heads import projector
from bigssl.optim import ParamRule


@register("swav")
class SwAV(Method):
    config_class = SwAVConfig
    config: SwAVConfig

    def build(self) -> None:
        method = self.config
        self.backbone = build_backbone(self.model_config)
        self.projector = projector(feature_dim(self.backbone), self.model_config.projector)
        dim = self.model_config.projector.out_dim
        self.prototypes = nn.Linear(dim, method.prototypes, bias=False)  # nn.Linear's init, as official
        with torch.no_grad():  # unit rows from the start, so a forward outside the trainer scores cosines
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        # Past embeddings of the 2 global crops, this rank's own; rows of zeros are "not filled
        # yet". A plain tensor, not a buffer: DDP would overwrite every rank's with rank 0's. Like
        # the official code's, it is not in the checkpoint: a resumed run refills it.
        self.queue = torch.zeros(2, method.queue_length // self.run.world_size, dim)

    def param_rules(self) -> list[ParamRule]:
        method = self.config
        frozen = method.freeze_prototypes_steps or round(method.freeze_prototypes_epochs * self.run.steps_per_epoch)
        return [ParamRule("prototypes.", frozen_steps=frozen)]

    def unit_norm_rows(self) -> list[nn.Parameter]:
        return [self.prototypes.weight]

    def _scores(self, z: torch.Tensor) -> torch.Tensor:
        return self.prototypes(z)  # rows already unit (unit_norm_rows)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        method = self.config
        groups = batch["views"]
        batch_size = groups[0].shape[1]
        features = [self.backbone(flat(group)) for group in groups]
        z = F.normalize(self.projector(torch.cat(features)), dim=1)
        scores = self._scores(z).view(-1, batch_size, method.prototypes)  # [V, B, K], globals first
        with torch.no_grad():
            codes = torch.stack([self._codes(scores[i], z[i * batch_size : (i + 1) * batch_size], i, step)
                                 for i in range(2)])
        loss = losses.swav_loss(scores, codes, method.temperature)
        stats = health.distillation_stats(codes[0], scores[1].detach() / method.temperature)
        return StepOutput(loss, features[0][:batch_size], z[:batch_size].detach(),
                          uniform_loss=loss.new_tensor(math.log(method.prototypes)), metrics=stats)

    def _codes(self, scores: torch.Tensor, z: torch.Tensor, crop: int, step: int) -> torch.Tensor:
        """Sinkhorn codes of one global crop; the queue (once started and full) joins the batch."""
        method = self.config
        if self.queue.device != z.device:
            self.queue = self.queue.to(z.device)
        queue = self.queue[crop]
        queuing = len(queue) > 0 and step >= method.queue_start_epoch * self.run.steps_per_epoch
        if queuing and len(queue) % len(z):
            raise ConfigError(f"method.queue_length: {len(queue)} per rank is not a multiple of the per-rank "
                              f"batch {len(z)}")
        if queuing and bool(queue[-1].any()):  # full: the last row has been written
            scores = torch.cat([self._scores(queue), scores])
        codes = losses.sinkhorn(scores, method.epsilon, method.sinkhorn_iterations)[-len(z):]
        if queuing:
            self.queue[crop] = torch.cat([z.detach(), queue[: -len(z)]])
        return codes
