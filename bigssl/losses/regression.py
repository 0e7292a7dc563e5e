"""Losses without negatives: a prediction regressed on a target (BYOL, SimSiam) and
redundancy reduction (Barlow Twins)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bigssl.distributed import comm


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z) = −cos(p, z), mean over the batch. The caller detaches z (stop-gradient)."""
    return -F.cosine_similarity(p.float(), z.float(), dim=-1).mean()


def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's ‖p̄ − z̄‖² = 2 − 2·cos(p, z), mean over the batch. The caller detaches z (the target)."""
    return 2 + 2 * negative_cosine(p, z)


def _standardize(z: torch.Tensor, total: int, distributed: bool) -> torch.Tensor:
    """BatchNorm without affine parameters over the global batch (biased variance, eps 1e-5, as
    the official SyncBN), with gradient through the statistics."""
    reduce = comm.all_reduce_sum_with_grad if distributed else (lambda x: x)
    mean = reduce(z.sum(dim=0)) / total
    var = reduce(((z - mean) ** 2).sum(dim=0)) / total
    return (z - mean) / torch.sqrt(var + 1e-5)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051, gather: bool = True,
                      differentiable_reduce: bool = True) -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021): Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij², C the cross-
    correlation of the two views' embeddings standardised along the global batch.

    Cross-rank: batch statistics and C = Σ_ranks z̃1ᵀz̃2 / N are all-reduced *with* gradient, so
    W ranks × B samples give the single-process loss and (after the engine's average) its
    gradients. `differentiable_reduce=False` is the official code's `all_reduce(c)`, which
    carries no gradient: each rank back-propagates only its own samples' share of C and the
    averaged gradient is 1/W of the single-process one (its published lr absorbed that).
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"barlow_twins_loss expects two [B, D] tensors of one shape, got {tuple(z1.shape)} "
                         f"and {tuple(z2.shape)}")
    distributed = gather and comm.is_distributed()
    total = len(z1) * (comm.world_size() if distributed else 1)
    c = _standardize(z1.float(), total, distributed).T @ _standardize(z2.float(), total, distributed) / total
    if distributed:
        if differentiable_reduce:
            c = comm.all_reduce_sum_with_grad(c)
        else:  # the global value, the local gradient
            c = c + (comm.all_reduce_sum_no_grad(c) - c).detach()
    on_diagonal = (torch.diagonal(c) - 1).pow(2).sum()
    off_diagonal = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diagonal + lambd * off_diagonal
