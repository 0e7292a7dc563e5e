"""Backbones from timm by name, always with pretrained=False (no hub access, no leakage)."""

from __future__ import annotations

import timm
import torch
from timm.layers import SelectAdaptivePool2d
from torch import nn

from bigssl.config import ModelConfig
from bigssl.errors import ConfigError


def use_small_stem(model: nn.Module, stride: int) -> None:
    """A 3×3 first convolution and no max-pool, so 28–64 px inputs keep spatial detail.

    This is the CIFAR convention (SimCLR App. B.9; solo-learn's ResNets). The stem keeps its
    width so the first residual stage still fits. timm's ResNet has no argument for this stem,
    so exports of such runs load with `bigssl.load_backbone`, which applies it again.
    """
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ConfigError(
            f"model.small_stem: only ResNet-style backbones (conv1 + maxpool) have a small-stem "
            f"option; {type(model).__name__} has not")
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride, 1, bias=False)
    model.maxpool = nn.Identity()


class GridPool(nn.Module):
    """Average-pools a (B, C, H, W) map to g×g cells and flattens them: (B, C·g²) features.

    Global average pooling throws away where each feature was; on 28 px images whose classes
    differ by shape (a sleeve, a heel) that position is most of the signal raw pixels keep.
    """

    def __init__(self, grid: int) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, self.grid).flatten(1)


def use_grid_pool(model: nn.Module, grid: int) -> None:
    """Swap timm's global pool for a `GridPool(grid)`; `num_features` grows to match."""
    pool = getattr(model, "global_pool", None)
    if not isinstance(pool, SelectAdaptivePool2d) or pool.pool_type != "avg":
        raise ConfigError(
            f"model.pool_grid: only CNN backbones with timm's average global pool can pool to a "
            f"grid; {type(model).__name__} has {type(pool).__name__ if pool is not None else 'none'}")
    model.global_pool = GridPool(grid)
    model.num_features = int(model.num_features) * grid * grid


def build_backbone(config: ModelConfig) -> nn.Module:
    """Returns a model whose forward gives pooled features of size `model.num_features`."""
    if not timm.is_model(config.backbone):
        raise ConfigError(f"model.backbone: {config.backbone!r} is not a timm model name")
    try:
        model = timm.create_model(config.backbone, pretrained=False, num_classes=0, **config.backbone_args)
    except TypeError as err:
        raise ConfigError(f"model.backbone_args: {err}") from err
    if config.small_stem:
        use_small_stem(model, config.small_stem_stride)
    if config.pool_grid > 1:
        use_grid_pool(model, config.pool_grid)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def feature_dim(model: nn.Module) -> int:
    return int(model.num_features)
