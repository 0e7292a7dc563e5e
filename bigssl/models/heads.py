"""Projection and prediction heads."""

from __future__ import annotations

from torch import nn

from bigssl.config import ProjectorConfig


def mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int, batch_norm: bool,
        last_batch_norm: bool | None = None, last_affine: bool = True,
        last_bias: bool | None = None) -> nn.Sequential:
    """Linear → (BN) → ReLU, repeated, then a final Linear (→ BN when `last_batch_norm`).

    SimCLR's official heads put BN on every layer, the output included, and drop the biases
    that a following BN would cancel. `last_bias` (default: no BN after it) is for heads whose
    official output layer has no bias although nothing normalises it (MoCo v3's ResNet predictor).
    """
    if layers < 1:
        raise ValueError("an MLP head needs at least one layer")
    last_batch_norm = batch_norm if last_batch_norm is None else last_batch_norm
    modules: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        modules += [nn.Linear(dim, hidden_dim, bias=not batch_norm)]
        if batch_norm:
            modules.append(nn.BatchNorm1d(hidden_dim))
        modules.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    modules.append(nn.Linear(dim, out_dim, bias=not last_batch_norm if last_bias is None else last_bias))
    if last_batch_norm:
        modules.append(nn.BatchNorm1d(out_dim, affine=last_affine))
    return nn.Sequential(*modules)


def projector(in_dim: int, config: ProjectorConfig) -> nn.Sequential:
    return mlp(in_dim, config.hidden_dim, config.out_dim, config.layers, config.batch_norm,
               config.last_batch_norm, config.last_affine)


def projector_prefix(head: nn.Sequential, layers: int) -> nn.Sequential:
    """The head up to its `layers`-th Linear and that layer's BN and ReLU: SimCLR v2 takes
    downstream features (and fine-tunes) from the first layer of its 3-layer projector."""
    linear_positions = [i for i, module in enumerate(head) if isinstance(module, nn.Linear)]
    if not 1 <= layers <= len(linear_positions):
        raise ValueError(f"the projector has {len(linear_positions)} linear layers, not {layers}")
    end = linear_positions[layers] if layers < len(linear_positions) else len(head)
    return nn.Sequential(*list(head)[:end])
