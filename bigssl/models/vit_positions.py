"""The official DINO way of fitting a ViT's position table to a smaller crop.

timm's `dynamic_img_size` resamples the patch table to the new grid with `size=` and antialias
on. The official DINO (facebookresearch/dino vision_transformer.py, `interpolate_pos_encoding`)
calls bicubic interpolation with `scale_factor=(h + 0.1)/√N` and no antialias: the output grid
is the same, but the sampling positions follow the given factor (14 → 6.1, not 14 → 6) and no
low-pass filter runs first. At ViT-S/16 on 96 px local crops (14 → 6) the two tables differ by
several per cent even for a smooth table: a different network on 10 of DINO's 12 crops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bigssl.errors import ConfigError


def dino_position_table(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """`table` [1, 1 + N, C] (class position first, then a √N × √N patch grid) for a
    `grid` = (rows, columns) of patches: unchanged for the square grid it was made for."""
    patches = table.shape[1] - 1
    side = math.isqrt(patches)
    rows, columns = grid
    if rows * columns == patches and rows == columns:
        return table
    square = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    # The 0.1 keeps floor(side × factor) at the wanted size despite rounding (the official value).
    resized = F.interpolate(square, scale_factor=((rows + 0.1) / side, (columns + 0.1) / side), mode="bicubic",
                            align_corners=False)
    if tuple(resized.shape[-2:]) != (rows, columns):
        raise ValueError(f"position table {side}×{side} resized to {tuple(resized.shape[-2:])}, not {grid}")
    return torch.cat([table[:, :1], resized.permute(0, 2, 3, 1).reshape(1, rows * columns, -1)], dim=1)


def _pos_embed_dino(self, x: torch.Tensor) -> torch.Tensor:
    """timm's `_pos_embed` for a class-token ViT with `dynamic_img_size` (x is [B, H, W, C]),
    with the DINO table."""
    batch, rows, columns, width = x.shape
    tokens = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, rows * columns, width)], dim=1)
    return self.pos_drop(tokens + dino_position_table(self.pos_embed, (rows, columns)))


_CLASSES: dict[type, type] = {}


def use_dino_position_table(model: nn.Module) -> None:
    """Make a timm ViT fit its position table to other crop sizes as the official DINO does
    (in place: the class becomes a subclass overriding `_pos_embed`; parameters, state-dict
    names and every other behaviour stay timm's)."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer) or not model.dynamic_img_size:
        return  # ResNets have no position table; a fixed-size ViT never resizes its own
    if model.pos_embed is None or model.no_embed_class or model.reg_token is not None or model.num_prefix_tokens != 1:
        raise ConfigError("method.pos_interpolation: dino needs a timm ViT with one class token and a learned "
                          "position table that covers it; use pos_interpolation: timm for other layouts")
    base = type(model)
    if base not in _CLASSES:
        _CLASSES[base] = type(f"{base.__name__}DINOPositions", (base,), {"_pos_embed": _pos_embed_dino})
    model.__class__ = _CLASSES[base]
