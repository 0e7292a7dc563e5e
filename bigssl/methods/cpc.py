"""CPC v2, contrastive predictive coding on image patches (Hénaff et al. 2019, arXiv 1905.09272;
CPC v1: van den Oord et al. 2018, arXiv 1807.03748).

An image becomes a grid of overlapping patches (`data.views.policy: cpc`); one encoder embeds
each patch (pooled features = its code z); a masked convolutional context network over the grid
of codes sees, at row i, only rows ≤ i, and a linear map W_k per offset predicts the code k
rows below; InfoNCE scores each prediction against every patch of the batch
(`bigssl.losses.cpc_loss`). CPC v2 predicts from several directions: `directions` runs the
same scheme on the grid flipped and transposed (up, right, left), one context network each.

The patch encoder must not use batch statistics: the patches of one image share a batch, so
BN would let a patch learn about its neighbours through the normalisation (CPC v2 uses layer
normalisation; `model.backbone_args.norm_layer: groupnorm1` gives it in timm's ResNets).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bigssl import losses
from bigssl.errors import ConfigError
from bigssl.methods.base import Batch, Method, StepOutput, register
from bigssl.methods.configs import CPCConfig
from bigssl.models.backbones import build_backbone, feature_dim

DIRECTIONS = ("down", "up", "right", "left")


class RowCausalConv(nn.Module):
    """A 3 × 3 convolution whose output at row i sees input rows i − 2 … i only (zero-padded
    above, not below): stacked, the context at row i never sees a row below it."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (1, 1, 2, 0)))  # left, right, top, bottom


class ContextNetwork(nn.Module):
    def __init__(self, dim: int, width: int, layers: int, steps: int) -> None:
        super().__init__()
        self.inp = RowCausalConv(dim, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), RowCausalConv(width, width), nn.ReLU(),
                                                  RowCausalConv(width, width)) for _ in range(layers))
        self.predictors = nn.ModuleList(nn.Conv2d(width, dim, 1) for _ in range(steps))  # W_k

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        context = self.inp(z)
        for block in self.blocks:
            context = context + block(context)
        return [predict(F.relu(context)) for predict in self.predictors]


def oriented(z: torch.Tensor, direction: str) -> torch.Tensor:
    """The grid turned so that `direction` becomes "down" (predict larger row indices)."""
    return {"down": z, "up": z.flip(2), "right": z.transpose(2, 3), "left": z.transpose(2, 3).flip(2)}[direction]


@register("cpc")
class CPC(Method):
    config_class = CPCConfig
    config: CPCConfig

    def build(self) -> None:
        method = self.config
        if self.view_layout.crop != "patch_grid":
            raise ConfigError(f"data.views.policy: method cpc needs the cpc policy (a grid of patches: crop "
                              f"patch_grid), not views cut by crop {self.view_layout.crop}")
        unknown = [d for d in method.directions if d not in DIRECTIONS]
        if unknown or not method.directions:
            raise ConfigError(f"method.directions: {method.directions} must be a non-empty subset of {DIRECTIONS}")
        self.backbone = build_backbone(self.model_config)
        batch_norms = [name for name, module in self.backbone.named_modules()
                       if isinstance(module, nn.modules.batchnorm._BatchNorm)]
        if batch_norms:
            raise ConfigError(f"model.backbone_args.norm_layer: the patch encoder has BatchNorm ({batch_norms[0]}): "
                              "patches of one image would share batch statistics; use groupnorm1 (layer norm)")
        dim = feature_dim(self.backbone)
        self.context = nn.ModuleDict({d: ContextNetwork(dim, method.context_dim, method.context_layers, method.steps)
                                      for d in method.directions})

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        patches = batch["views"][0]  # [G², B, C, P, P], row-major over the grid
        cells, images = patches.shape[:2]
        grid = round(cells**0.5)
        codes = self.backbone(patches.flatten(0, 1))  # [G²·B, D]
        z = codes.view(grid, grid, images, -1).permute(2, 3, 0, 1)  # [B, D, G, G]
        loss = sum(losses.cpc_loss(network(oriented(z, d)), oriented(z, d)) for d, network in self.context.items())
        loss = loss / len(self.context)
        pooled = z.mean(dim=(2, 3))  # an image's representation: its patch codes, mean-pooled (CPC v1 §3.2)
        return StepOutput(loss, pooled, pooled.detach())
