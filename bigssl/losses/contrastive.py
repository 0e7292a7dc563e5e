"""Contrastive losses: an anchor against a positive and negatives (SimCLR, the MoCo family,
InstDisc, InvaSpread, CLIP)."""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def multiview_nt_xent(views: Sequence[torch.Tensor], temperature: float = 0.1, gather: bool = True) -> torch.Tensor:
    """NT-Xent over V ≥ 2 views of each image: every other view of an anchor's image is a positive.

    views: V tensors `[B, D]`, view v of the same B images (not normalised). Each of the V·N
    anchors of the global batch scores the V·N − 1 other views; its loss is the mean over its
    V − 1 positives p of −log(exp(s_p/τ) / Σ_{a ≠ anchor} exp(s_a/τ)): the multi-positive form of
    Khosla et al. 2020 (SupCon, arXiv 2004.11362, L_out) with the image as the label, as Tian
    2022 (ECPP, arXiv 2401.05730) and Shidani et al. 2024 (poly-view, arXiv 2403.05490) use it
    to get more pairs from each decoded image. For V = 2 it is `nt_xent`.

    Cross-rank: as `nt_xent`: candidates gathered with gradient (one collective), each rank
    scores its own V·B anchors.
    """
    count = len(views)
    if count < 2 or any(v.shape != views[0].shape or v.ndim != 2 for v in views):
        raise ValueError(f"multiview_nt_xent expects two or more [B, D] tensors of one shape, "
                         f"got {[tuple(v.shape) for v in views]}")
    z = torch.stack([F.normalize(v.float(), dim=1) for v in views], dim=1)  # [B, V, D]
    local = z.shape[0]
    if gather and comm.is_distributed():
        offset, everyone = comm.rank() * local, comm.gather_with_grad(z)
    else:
        offset, everyone = 0, z
    total = everyone.shape[0]
    anchors = z.transpose(0, 1).flatten(0, 1)  # [V·B, D], view-major
    candidates = everyone.transpose(0, 1).flatten(0, 1)  # [V·N, D], view-major
    logits = anchors @ candidates.T / temperature
    device = z.device
    anchor_view = torch.arange(count, device=device).repeat_interleave(local)  # [V·B]
    image = offset + torch.arange(local, device=device).repeat(count)  # its image's global index
    rows = torch.arange(count * local, device=device)
    logits[rows, anchor_view * total + image] = float("-inf")  # an anchor is not its own candidate
    log_prob = logits.log_softmax(dim=1)
    same_image = torch.arange(count, device=device)[None, :] * total + image[:, None]  # [V·B, V]
    others = anchor_view[:, None] != torch.arange(count, device=device)[None, :]
    return -log_prob.gather(1, same_image)[others].mean()


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float, queue: torch.Tensor | None = None,
             gather: bool = True) -> torch.Tensor:
    """InfoNCE of queries against keys (MoCo family); q, k `[B, D]`, normalised here.

    Without a queue (MoCo v3): each query's positive is its own key, the negatives are the keys
    of every other image in the global batch; keys are gathered from all ranks *without*
    gradient (they come from the momentum encoder) and the label of query i on rank r is
    r·B + i. MoCo v3 multiplies the result by 2τ; that is the method's business.
    With `queue` `[K, D]` (MoCo v1/v2, normalised by the caller): logit 0 is q·k, the others are
    q against the queue; nothing crosses ranks here (the method enqueues gathered keys).
    Mean over the local queries.
    """
    if q.shape != k.shape or q.ndim != 2:
        raise ValueError(f"info_nce expects q and k of one [B, D] shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    if queue is not None:
        positives = (q * k).sum(dim=1, keepdim=True)
        logits = torch.cat([positives, q @ queue.detach().float().T], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
    offset = 0
    if gather and comm.is_distributed():
        offset = comm.rank() * len(k)
        k = comm.gather_no_grad(k)
    labels = offset + torch.arange(len(q), device=q.device)
    return F.cross_entropy(q @ k.T / temperature, labels)


def invaspread_loss(f: torch.Tensor, f_hat: torch.Tensor, temperature: float = 0.1,
                    gather: bool = True) -> torch.Tensor:
    """InvaSpread's instance softmax (Ye et al. 2019, eq. 5): the 2N features of two views of N
    images; for each anchor, P(k | anchor) = softmax over the other 2N − 1 features of aᵀf_k/τ;
    J = −log P(positive) − Σ_{k ≠ anchor, positive} log(1 − P(k)), mean over the anchors.

    As in the official code the candidate side of every similarity is detached: the gradient
    reaches each feature through its own anchor row only. So the candidates are gathered from
    every rank without gradient, each rank scores its own 2B anchors, and W ranks × B samples
    give exactly the one-process loss and gradients of the W·B images.
    """
    if f.shape != f_hat.shape or f.ndim != 2:
        raise ValueError(f"invaspread_loss expects two [B, D] tensors of one shape, got {tuple(f.shape)} "
                         f"and {tuple(f_hat.shape)}")
    f, f_hat = F.normalize(f.float(), dim=1), F.normalize(f_hat.float(), dim=1)
    local = len(f)
    distributed = gather and comm.is_distributed()
    offset = comm.rank() * local if distributed else 0
    all_f = comm.gather_no_grad(f) if distributed else f.detach()
    all_f_hat = comm.gather_no_grad(f_hat) if distributed else f_hat.detach()
    total = len(all_f)
    anchors = torch.cat([f, f_hat])  # [2B, D]
    logits = anchors @ torch.cat([all_f, all_f_hat]).T / temperature  # [2B, 2N]
    rows = torch.arange(2 * local, device=f.device)
    own = torch.cat([offset + rows[:local], total + offset + rows[:local]])
    positive = torch.cat([total + offset + rows[:local], offset + rows[:local]])
    logits[rows, own] = float("-inf")  # an anchor is not its own candidate
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    # log(1 − P) for every candidate; the anchor's own column (P = 0) adds 0, the positive is removed.
    log_not = torch.log1p(-log_p.exp().clamp(max=1 - 1e-6))
    negatives = log_not.sum(dim=1) - log_not[rows, positive]
    return -(log_p[rows, positive] + negatives).mean()


def nce_loss(scores: torch.Tensor, log_normaliser: torch.Tensor | float, population: int) -> torch.Tensor:
    """InstDisc's noise-contrastive estimation (Wu et al. 2018, eq. 6-7): scores `[B, 1 + m]` of
    vᵀf/τ, the positive entry first, then m noise entries drawn uniformly from `population`.
    P(i|f) = exp(score)/Z; h = P/(P + m/n); J = −[log h(positive) + Σ log(1 − h(noise))], mean
    over the batch, computed in the log domain. Nothing crosses ranks (Z is the caller's)."""
    noise = scores.shape[1] - 1
    log_p = scores.float() - log_normaliser
    log_noise = math.log(noise / population)
    log_denominator = torch.logaddexp(log_p, torch.full_like(log_p, log_noise))  # log(P + m/n)
    log_h_positive = log_p[:, 0] - log_denominator[:, 0]
    log_not_noise = log_noise - log_denominator[:, 1:]  # log(1 − h) = log(m/n) − log(P + m/n)
    return -(log_h_positive + log_not_noise.sum(dim=1)).mean()


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float,
              gather: bool = True) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (Radford et al. 2021, Fig. 3): image and text embeddings `[B, D]`
    of B pairs, normalised here; logits = scale · I Tᵀ over the global batch; the mean of the
    cross-entropies along rows (image → its caption) and columns (caption → its image).

    Cross-rank: both sides are gathered *with* gradient and each rank scores only its own rows
    (its images against all captions, its captions against all images): the mean over ranks is
    the global loss and, after the engine's average, the gradients are the one-process ones.
    `logit_scale` is the multiplier itself (exp of the learned log-scale, clamped by the caller).
    """
    if image.shape != text.shape or image.ndim != 2:
        raise ValueError(f"clip_loss expects image and text embeddings of one [B, D] shape, got "
                         f"{tuple(image.shape)} and {tuple(text.shape)}")
    image, text = F.normalize(image.float(), dim=1), F.normalize(text.float(), dim=1)
    offset = 0
    all_image, all_text = image, text
    if gather and comm.is_distributed():
        offset = comm.rank() * len(image)
        all_image, all_text = comm.gather_with_grad(image), comm.gather_with_grad(text)
    labels = offset + torch.arange(len(image), device=image.device)
    per_image = logit_scale * image @ all_text.T
    per_text = logit_scale * text @ all_image.T
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


def cpc_loss(predictions: list[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """CPC's InfoNCE over a grid of patch codes (van den Oord et al. 2018 §2–3; Hénaff et al.
    2019). z `[B, D, G, G]`: the code of every patch (row, column) of B images; predictions[k−1]
    `[B, D, G, G]`: at (i, j), the prediction W_k c_{i,j} of z_{i+k, j}, made from a context that
    saw rows ≤ i only. Each prediction of a patch that exists (i + k < G) scores its target
    against every patch of every image in the batch (other positions of its own image and all
    of the others are the negatives); cross-entropy, mean over queries, then over k. Local to
    the rank (CPC's negatives are the per-device batch)."""
    batch, dim, grid, _ = z.shape
    candidates = z.permute(0, 2, 3, 1).reshape(-1, dim).float()  # row-major: b, i, j
    image = torch.arange(batch, device=z.device)[:, None, None]
    rows = torch.arange(grid, device=z.device)[None, :, None]
    cols = torch.arange(grid, device=z.device)[None, None, :]
    total = z.new_zeros((), dtype=torch.float32)
    used = 0
    for k, prediction in enumerate(predictions, start=1):
        if k >= grid:
            break
        queries = prediction[:, :, : grid - k, :].permute(0, 2, 3, 1).reshape(-1, dim).float()
        targets = (image * grid * grid + (rows[:, : grid - k] + k) * grid + cols).reshape(-1)
        total = total + F.cross_entropy(queries @ candidates.T, targets)
        used += 1
    if not used:
        raise ValueError(f"cpc_loss: a {grid} × {grid} grid leaves nothing to predict {len(predictions)} rows ahead")
    return total / used
