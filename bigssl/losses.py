"""Self-supervised losses as plain functions on tensors.

Each function states what crosses ranks and with which gradient. With `gather=True` and a
process group up, the loss on W ranks × B samples has the same value (averaged over ranks)
and, after the engine averages gradients, the same gradients as one rank holding all W·B
samples. With `gather=False`, or in a single process, only the local batch is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bigssl.distributed import comm


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, gather: bool = True) -> torch.Tensor:
    """SimCLR's normalised-temperature cross entropy (Chen et al. 2020, eq. 1).

    z1, z2: `[B, D]` projections of two views of the same B images (not normalised).
    Returns the mean over the 2N anchors of the global batch (N = W·B); each anchor has one
    positive (the other view of its image) and 2(N−1) negatives.

    Cross-rank: the candidates are gathered from every rank *with* gradient (backward sums over
    ranks, then takes the local slice). Each rank scores only its own 2B anchors against all 2N
    candidates, so the work per rank is 2B × 2N, not 2N × 2N.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(
            f"nt_xent expects two [B, D] tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    # Similarities in fp32: exp(1/τ) at τ = 0.1 is fine in bf16, but log-sum-exp over
    # thousands of candidates loses the small differences that carry the gradient.
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    local = z1.shape[0]
    if gather and comm.is_distributed():
        offset = comm.rank() * local
        all_z1, all_z2 = comm.gather_with_grad(z1), comm.gather_with_grad(z2)
    else:
        offset = 0
        all_z1, all_z2 = z1, z2
    total = all_z1.shape[0]

    anchors = torch.cat([z1, z2], dim=0)  # [2B, D]
    candidates = torch.cat([all_z1, all_z2], dim=0)  # [2N, D]
    logits = anchors @ candidates.T / temperature  # [2B, 2N]

    rows = torch.arange(local, device=z1.device)
    own_index = torch.cat([offset + rows, total + offset + rows])  # each anchor's own column
    positive_index = torch.cat([total + offset + rows, offset + rows])  # the other view
    logits[torch.arange(2 * local, device=z1.device), own_index] = float("-inf")
    return F.cross_entropy(logits, positive_index)
