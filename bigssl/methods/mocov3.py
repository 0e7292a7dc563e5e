"""MoCo v3 (Chen, Xie, He 2021, arXiv 2104.02057).

A query network (backbone → projector → predictor) and a momentum network (backbone →
projector, EMA m 0.99 → 1 cosine). Symmetric InfoNCE over in-batch keys gathered from every
rank without gradient, scaled by 2τ: L = ctr(q1, k2) + ctr(q2, k1). Each crop goes through the
networks on its own (BN per crop, as in the official code).

ViTs get the official vits.py (facebookresearch/moco-v3 @c349e6e, lines 28-69): Xavier-uniform
on every Linear of the trunk, the qkv matrix counted as three layers, zero biases, a class token
of std 1e-6, a random patch projection (frozen by default: the paper's fix for its training
instability) and a fixed 2-D sin-cos position table. The projector and predictor are built
afterwards with nn.Linear's own init (builder.py:36-52), and end in BN without affine.

Momentum index: the official step t first moves the key encoder with m(t), the cosine at the
fractional epoch of t, then computes the keys (builder.py:89-90, main_moco.py:342-353). The
trainer moves the teacher after optimizer step t, so `ema_momentum(t)` returns m(t + 1): the
update the official code makes at the start of step t + 1, on the same query weights. (Its
update at step 0 acts on two equal encoders.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bigssl import losses
from bigssl.errors import ConfigError
from bigssl.methods.base import Batch, Method, StepOutput, register
from bigssl.methods.configs import MoCoV3Config
from bigssl.methods.teacher import EMATeacher
from bigssl.models.backbones import build_backbone, feature_dim
from bigssl.models.heads import mlp, projector


def sincos_position_table(rows: int, cols: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """[rows·cols, dim] for row-major patches: sin(r·ω), cos(r·ω), sin(c·ω), cos(c·ω) in four
    quarters, ω_k = temperature^(−k/(dim/4)). vits.py:53-69's channel order (timm's own helper
    interleaves the quarters differently); on the square grids that code builds, its first
    coordinate is the patch row."""
    if dim % 4:
        raise ConfigError(f"model.backbone: MoCo v3's sin-cos position table needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    row, col = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32),
                              indexing="ij")
    row_angles, col_angles = torch.outer(row.flatten(), omega), torch.outer(col.flatten(), omega)
    return torch.cat([row_angles.sin(), row_angles.cos(), col_angles.sin(), col_angles.cos()], dim=1)


def xavier_bound(fan_out: int, fan_in: int) -> float:
    return math.sqrt(6.0 / (fan_out + fan_in))


@torch.no_grad()
def _xavier_linears(backbone: nn.Module) -> None:
    """Every Linear of the trunk: uniform on ±√(6 / (fan_out + fan_in)), zero bias. The fused
    qkv matrix is three layers of a third of its rows each, so its fan_out is a third."""
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Linear):
            fan_out, fan_in = module.weight.shape
            bound = xavier_bound(fan_out // 3 if "qkv" in name else fan_out, fan_in)
            module.weight.uniform_(-bound, bound)
            if module.bias is not None:
                module.bias.zero_()


@torch.no_grad()
def _mocov3_vit(backbone: nn.Module, config: MoCoV3Config) -> None:
    """The ViT changes of MoCo v3's vits.py, applied to a timm ViT."""
    _xavier_linears(backbone)
    if getattr(backbone, "cls_token", None) is not None:
        backbone.cls_token.normal_(std=1e-6)
    if config.sincos_pos_embed and getattr(backbone, "pos_embed", None) is not None:
        rows, cols = backbone.patch_embed.grid_size
        prefix = backbone.pos_embed.shape[1] - rows * cols
        table = sincos_position_table(rows, cols, backbone.pos_embed.shape[-1])
        backbone.pos_embed[:, prefix:] = table.unsqueeze(0)
        backbone.pos_embed[:, :prefix] = 0  # the class token's position is zero
        backbone.pos_embed.requires_grad_(False)
    proj = backbone.patch_embed.proj
    if isinstance(proj, nn.Conv2d):
        # Xavier-uniform with the flattened patch (C·p·p) as fan-in, initialised whether or not it is frozen.
        bound = xavier_bound(proj.weight.shape[0], math.prod(proj.weight.shape[1:]))
        proj.weight.uniform_(-bound, bound)
        if proj.bias is not None:
            proj.bias.zero_()
        if config.frozen_patch_embed:
            proj.requires_grad_(False)


@register("mocov3")
class MoCoV3(Method):
    config_class = MoCoV3Config
    config: MoCoV3Config

    def build(self) -> None:
        method = self.config
        self.backbone = build_backbone(self.model_config)
        vit = hasattr(self.backbone, "patch_embed")
        if vit:
            _mocov3_vit(self.backbone, method)
        self.projector = projector(feature_dim(self.backbone), self.model_config.projector)
        out = self.model_config.projector.out_dim
        # The ViT predictor ends in BN without affine, the ResNet one in a Linear without bias
        # (builder.py:42, 109 and 122: every Linear of the heads is bias-free).
        self.predictor = mlp(out, method.predictor_hidden_dim, out, layers=2, batch_norm=True, last_batch_norm=vit,
                             last_affine=False, last_bias=False)
        # m(step + 1): the official update at the start of the next step (see the module docstring).
        self.teacher = EMATeacher(method.momentum, final=1.0, total_steps=self.run.total_steps, lead=1)
        self.momentum_backbone = self.teacher.copy(self.backbone)
        self.momentum_projector = self.teacher.copy(self.projector)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        tau = self.config.temperature
        views = batch["views"][0]
        features = [self.backbone(views[v]) for v in range(2)]
        queries = [self.predictor(self.projector(h)) for h in features]
        with torch.no_grad():
            keys = [self.momentum_projector(self.momentum_backbone(views[v])) for v in range(2)]
        loss = 2 * tau * (losses.info_nce(queries[0], keys[1], tau) + losses.info_nce(queries[1], keys[0], tau))
        return StepOutput(loss, features[0], keys[0], metrics={"temperature": loss.new_tensor(tau)})
