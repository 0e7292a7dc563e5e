"""Where a ViT looks: the [CLS] token's attention over the patches in the last block, per head
(DINO's figure 1 maps), for a few fixed images, as one image for TensorBoard."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import make_grid


def has_attention_maps(model: nn.Module) -> bool:
    blocks = getattr(model, "blocks", None)
    return bool(blocks) and hasattr(blocks[-1], "attn") and hasattr(blocks[-1].attn, "qkv")


@torch.no_grad()
def cls_attention(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[B, heads, gh, gw]: softmax(q_cls · kᵀ / √d) of the last block over the patch tokens,
    computed from the block's own input, projections and norms (its fused kernel keeps none)."""
    attention = model.blocks[-1].attn
    captured: list[torch.Tensor] = []
    handle = attention.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        handle.remove()
        model.train(was_training)
    x = captured[-1]
    batch, tokens, _ = x.shape
    qkv = attention.qkv(x).reshape(batch, tokens, 3, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attention.q_norm(qkv[0]), attention.k_norm(qkv[1])
    weights = ((q[:, :, :1] * attention.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, 1, N]
    prefix = getattr(model, "num_prefix_tokens", 1)
    patches = weights[:, :, 0, prefix:]
    side_h = images.shape[-2] // model.patch_embed.patch_size[0]
    side_w = patches.shape[-1] // side_h
    return patches.reshape(batch, attention.num_heads, side_h, side_w)


def attention_grid(images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """One row per image: the image (in [0, 1]), then each head's map scaled to its own max."""
    batch, heads = maps.shape[:2]
    size = images.shape[-2:]
    up = F.interpolate(maps.float().cpu(), size=size, mode="nearest")
    up = up / up.flatten(2).amax(dim=2).clamp(min=1e-12)[..., None, None]
    tiles = []
    for index in range(batch):
        tiles.append(images[index].float().cpu().clamp(0, 1))
        tiles.extend(up[index, head].expand(3, *size) for head in range(heads))
    return make_grid(torch.stack(tiles), nrow=heads + 1, padding=2, pad_value=1.0)
