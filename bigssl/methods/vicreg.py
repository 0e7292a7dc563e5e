"""VICReg (Bardes, Ponce, LeCun 2022, arXiv 2105.04906): its config, its loss and the method, in one file.

Two views go through one backbone and an expander (Linear → BN → ReLU, repeated, then a plain
Linear without bias: official 8192-8192-8192). The loss, as the official main_vicreg.py
computes it (facebookresearch/vicreg), for embeddings z, z' of n samples and d dimensions:

    25 · mean((z − z')²)                                     invariance, over n·d, local batch
  + 25 · ½ [mean_j relu(1 − √(Var z_j + 1e-4)) + same for z']  variance, unbiased Var, global batch
  +  1 · [Σ_{i≠j} Cov(z)_ij² / d + same for z']              covariance, /(n − 1), global batch

The official code differs from the paper's equations in two places, and this follows the code:
the invariance is the mean over n·d elements (the paper's s(Z, Z') sums over the d dimensions,
so it is d × the code's), and each branch's variance term is halved (the paper's loss adds
v(Z) + v(Z')). Its output Linear has no bias, which the loss could not train anyway: every
term is unchanged by a shift of z and z' alike. The hidden Linears have none either (bigssl's
mlp drops a bias that the BN after it cancels; the official code keeps it, to the same effect).

Across ranks: the variance and covariance terms are computed on the global batch, both views
all-gathered with gradient (the official FullGatherLayer; here `comm.gather_with_grad`), the
invariance on the local batch (the official `F.mse_loss` before the gather). With equal local
batches the mean over ranks of the loss is the single-process loss, and each rank's gradient is
W × the single-process one for its samples, which the engine's average over ranks brings back
to exactly the single-process gradient (tests/test_vicreg.py).

A built-in of one file: its schema is registered by this module, not listed in configs.py
(bigssl/methods/schemas.py finds it by name), so a recipe naming `vicreg` imports torch before
its config is checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from bigssl.config import MethodConfig
from bigssl.config_ranges import NON_NEGATIVE, POSITIVE, Bound
from bigssl.distributed import comm
from bigssl.errors import ConfigError
from bigssl.methods.base import Batch, Method, StepOutput, register
from bigssl.models.backbones import build_backbone, feature_dim
from bigssl.models.heads import mlp


@dataclass
class VICRegConfig(MethodConfig):
    name: str = "vicreg"
    invariance_weight: float = 25.0  # λ, the official --sim-coeff
    variance_weight: float = 25.0  # μ, --std-coeff
    covariance_weight: float = 1.0  # ν, --cov-coeff
    std_target: float = 1.0  # γ, the std each dimension is held above
    variance_eps: float = 1.0e-4  # ε inside the square root
    gather: bool = True  # variance and covariance over the global batch; false: each rank's own

    # Not in configs.py, so config_ranges.METHOD_RANGES does not cover these: the config check reads them here.
    ranges: ClassVar[Mapping[str, Bound]] = {
        "invariance_weight": NON_NEGATIVE, "variance_weight": NON_NEGATIVE, "covariance_weight": NON_NEGATIVE,
        "std_target": POSITIVE, "variance_eps": POSITIVE}


def _variance_term(z: torch.Tensor, std_target: float, eps: float) -> torch.Tensor:
    """mean_j relu(γ − √(Var z_j + ε)), the unbiased variance along the batch."""
    return F.relu(std_target - torch.sqrt(z.var(dim=0) + eps)).mean()


def _covariance_term(z: torch.Tensor) -> torch.Tensor:
    """Σ_{i≠j} C_ij² / d, C the covariance matrix of z's d dimensions along the batch, /(n − 1)."""
    n, d = z.shape
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (n - 1)
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, invariance_weight: float = 25.0, variance_weight: float = 25.0,
                covariance_weight: float = 1.0, std_target: float = 1.0, eps: float = 1e-4,
                gather: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted loss and its three unweighted terms (detached, for logging). In float32
    whatever the autocast dtype: the covariance sums d² squares."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"vicreg_loss expects two [B, D] tensors of one shape, got {tuple(z1.shape)} "
                         f"and {tuple(z2.shape)}")
    z1, z2 = z1.float(), z2.float()
    invariance = F.mse_loss(z1, z2)
    if gather:
        z1, z2 = comm.gather_with_grad(z1), comm.gather_with_grad(z2)
    if len(z1) < 2:
        raise ValueError("vicreg_loss needs at least 2 samples for a variance along the batch")
    variance = (_variance_term(z1, std_target, eps) + _variance_term(z2, std_target, eps)) / 2
    covariance = _covariance_term(z1) + _covariance_term(z2)
    loss = invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance
    return loss, {"invariance": invariance.detach(), "variance": variance.detach(),
                  "covariance": covariance.detach()}


@register("vicreg")
class VICReg(Method):
    """`model.projector` sizes the expander (hidden_dim, out_dim, layers, batch_norm); its output
    is always the official plain Linear: `last_batch_norm` unset or false, never true (a BN
    there would hold every std at 1 and leave the variance term nothing to do)."""

    config_class = VICRegConfig
    config: VICRegConfig

    def build(self) -> None:
        head = self.model_config.projector
        if head.last_batch_norm:
            raise ConfigError("model.projector.last_batch_norm: VICReg's expander ends in a plain Linear; "
                              "set it to false")
        self.backbone = build_backbone(self.model_config)
        self.projector = mlp(feature_dim(self.backbone), head.hidden_dim, head.out_dim, head.layers,
                             head.batch_norm, last_batch_norm=False, last_bias=False)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        method = self.config
        views = batch["views"][0]
        # One backbone pass per view, as the official forward: BN statistics per view.
        features = [self.backbone(views[v]) for v in range(2)]
        z1, z2 = (self.projector(h) for h in features)
        loss, terms = vicreg_loss(z1, z2, method.invariance_weight, method.variance_weight, method.covariance_weight,
                                  method.std_target, method.variance_eps, gather=method.gather)
        return StepOutput(loss, features[0], z1.detach(), metrics=terms)
