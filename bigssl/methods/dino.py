"""DINO (Caron et al. 2021, arXiv 2104.14294).

Self-distillation without labels: a student sees every crop (2 global + N local), an EMA
teacher (0.996 → 1, cosine) sees the global crops, and the student's softmax(·/0.1) is pulled
to the teacher's centred, sharpened softmax((· − c)/τ_t) for every pair of different crops
(`bigssl.losses.dino_loss`, which sums over teacher views first). The centre c follows the
all-reduced batch mean of the teacher's outputs (momentum 0.9); τ_t warms up 0.04 → 0.07 over
30 epochs, per epoch as in the official code; weight decay follows a cosine 0.04 → 0.4; the
head's weight-normalised last layer is left out of the optimizer for the first epoch. Every
schedule is a function of the step and is logged.

Head: MLP (2048, GELU, no BN) → 256-d bottleneck → L2-normalise → weight-normalised linear to
K = 65536 outputs without bias; with `norm_last_layer` its scale is fixed at 1 (cosine-like
prototypes). The teacher is built without drop-path (the student's regulariser). Local crops
meet a position table fitted the official way (`bigssl.models.vit_positions`).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from bigssl import health, losses
from bigssl.distributed import comm
from bigssl.errors import ConfigError
from bigssl.methods.base import Batch, Method, StepOutput, flat, register
from bigssl.methods.configs import DINOConfig
from bigssl.methods.teacher import EMATeacher
from bigssl.models.backbones import build_backbone, feature_dim
from bigssl.models.vit_positions import use_dino_position_table
from bigssl.optim import ParamRule
from bigssl.schedules import cosine_to, linear_warmup


class WeightNormLinear(nn.Module):
    """y = x · (g · v/‖v‖)ᵀ per output row, no bias; g fixed at 1 unless `learn_scale`."""

    def __init__(self, in_dim: int, out_dim: int, learn_scale: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        # nn.Linear's own init, U(±1/√in), as the official head keeps for this layer (it is
        # created after the trunc-normal init of the MLP). Only its direction enters the
        # forward, but its norm sets how far each AdamW step turns it.
        bound = 1 / math.sqrt(in_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        self.scale = nn.Parameter(torch.ones(out_dim, 1)) if learn_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.normalize(self.weight, dim=1)
        return x @ (weight if self.scale is None else weight * self.scale).T


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, config: DINOConfig) -> None:
        super().__init__()
        def hidden(width_in: int) -> list[nn.Module]:
            norm = [nn.BatchNorm1d(config.hidden_dim)] if config.head_batch_norm else []
            return [nn.Linear(width_in, config.hidden_dim), *norm, nn.GELU()]

        self.mlp = nn.Sequential(*hidden(in_dim), *hidden(config.hidden_dim),
                                 nn.Linear(config.hidden_dim, config.bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = WeightNormLinear(config.bottleneck_dim, config.out_dim, not config.norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


@register("dino")
class DINO(Method):
    config_class = DINOConfig
    config: DINOConfig

    def build(self) -> None:
        method, model = self.config, self.model_config
        self.backbone = build_backbone(model)
        if getattr(self.backbone, "cls_token", None) is not None:
            # The official ViT draws its class token from trunc-normal 0.02 (timm: normal 1e-6).
            nn.init.trunc_normal_(self.backbone.cls_token, std=0.02)
        self.head = DINOHead(feature_dim(self.backbone), method)
        self.teacher = EMATeacher(method.momentum, final=1.0, total_steps=self.run.total_steps)
        teacher_model = copy.deepcopy(model)
        teacher_model.backbone_args = {k: v for k, v in model.backbone_args.items()
                                       if k not in ("drop_path_rate", "drop_rate")}
        self.teacher_backbone = self.teacher.follow(self.backbone, build_backbone(teacher_model))
        self.teacher_backbone.load_state_dict(self.backbone.state_dict())
        self.teacher_head = self.teacher.copy(self.head)
        if method.pos_interpolation == "dino":
            use_dino_position_table(self.backbone)
            use_dino_position_table(self.teacher_backbone)
        elif method.pos_interpolation != "timm":
            raise ConfigError(f"method.pos_interpolation: {method.pos_interpolation!r} is not one of dino, timm")
        self.register_buffer("center", torch.zeros(1, method.out_dim))

    def teacher_temperature(self, step: int) -> float:
        """The official schedule is per epoch, np.linspace(τ0, τ1, W)[epoch]: τ1 reached at
        epoch W − 1. A whole number of warm-up epochs follows it exactly; a fractional one (a
        short run) moves per step instead."""
        m, steps_per_epoch = self.config, self.run.steps_per_epoch
        warmup = m.teacher_temp_warmup_epochs
        if warmup >= 1 and warmup == int(warmup):
            epoch = step // steps_per_epoch
            if epoch >= warmup:
                return m.teacher_temp_final
            return m.teacher_temp + (m.teacher_temp_final - m.teacher_temp) * epoch / max(1, warmup - 1)
        return linear_warmup(m.teacher_temp, m.teacher_temp_final, step, round(warmup * steps_per_epoch))

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        method = self.config
        groups = batch["views"]
        batch_size = groups[0].shape[1]
        features = [self.backbone(flat(group)) for group in groups]
        student = self.head(torch.cat(features)).view(-1, batch_size, method.out_dim)  # [n_s, B, K]
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(flat(groups[0]))).view(-1, batch_size, method.out_dim)
        teacher_temp = self.teacher_temperature(step)
        loss = losses.dino_loss(student, teacher, self.center, method.student_temp, teacher_temp)
        with torch.no_grad():
            teacher_probs = torch.softmax((teacher[0].float() - self.center) / teacher_temp, dim=-1)
            stats = health.distillation_stats(teacher_probs, student[1].detach() / method.student_temp)
            self._update_center(teacher)
        # Collapse is watched on the backbone's features (the K-dim head output is a distribution).
        return StepOutput(loss, features[0][:batch_size], features[0][:batch_size].detach(),
                          uniform_loss=loss.new_tensor(math.log(method.out_dim)),
                          metrics={"teacher_temp": loss.new_tensor(teacher_temp), **stats})

    @torch.no_grad()
    def _update_center(self, teacher: torch.Tensor) -> None:
        """c ← m·c + (1 − m)·mean of the teacher outputs over the global batch (all-reduced)."""
        momentum = self.config.center_momentum
        rows = teacher.shape[0] * teacher.shape[1]
        total = comm.all_reduce_sum_no_grad(teacher.float().sum(dim=(0, 1)))
        self.center.mul_(momentum).add_(total / (rows * comm.world_size()), alpha=1 - momentum)

    def weight_decay_at(self, step: int) -> float:
        """A cosine from the optimizer's weight decay to `weight_decay_end` over training."""
        return cosine_to(self.run.weight_decay, self.config.weight_decay_end, step, self.run.total_steps)

    def param_rules(self) -> list[ParamRule]:
        frozen = round(self.config.freeze_last_layer_epochs * self.run.steps_per_epoch)
        return [ParamRule("head.last_layer.", frozen_steps=frozen)]
