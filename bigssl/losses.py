"""Self-supervised losses as plain functions on tensors.

Each function states what crosses ranks and with which gradient. With `gather=True` and a
process group up, the loss on W ranks × B samples has the same value (averaged over ranks)
and, after the engine averages gradients, the same gradients as one rank holding all W·B
samples. With `gather=False`, or in a single process, only the local batch is used.
"""

from __future__ import annotations

import math

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


def _logsumexp(x: torch.Tensor, dim: int | None, distributed: bool) -> torch.Tensor:
    """log Σ exp(x) over `dim` (all of x when None) and, when `distributed`, over every rank."""
    peak = x.max() if dim is None else x.max(dim=dim, keepdim=True).values
    if distributed:
        peak = comm.all_reduce_max_no_grad(peak)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.exp(x - peak).sum() if dim is None else torch.exp(x - peak).sum(dim=dim, keepdim=True)
    if distributed:
        total = comm.all_reduce_sum_no_grad(total)
    return total.log() + peak


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3, gather: bool = True) -> torch.Tensor:
    """SwAV's codes: `[B, K]` soft assignments of the samples to K prototypes whose rows sum to 1
    and whose prototypes share the global batch equally (Sinkhorn–Knopp on exp(scores/ε), the
    official iteration: normalise the total, then per iteration the prototypes, then the samples).

    Cross-rank: the total and the per-prototype sums are all-reduced (no gradient); the
    per-sample normalisation stays local. Runs in the log domain in fp32 (every sum a
    log-sum-exp), so it computes the same iteration without overflow or underflow: bf16 scores
    and a small ε (which make exp(score/ε) overflow fp32 or a sample's whole column vanish) are safe.
    """
    distributed = gather and comm.is_distributed()
    prototypes = scores.shape[1]
    total_samples = len(scores) * (comm.world_size() if distributed else 1)
    log_q = scores.float().T / epsilon  # [K, B]
    log_q -= _logsumexp(log_q, None, distributed)
    for _ in range(iterations):
        log_q -= _logsumexp(log_q, 1, distributed) + math.log(prototypes)  # each prototype: 1/K of the mass
        log_q -= _logsumexp(log_q, 0, False) + math.log(total_samples)  # each sample: 1/N of it
    return torch.exp(log_q + math.log(total_samples)).T


def swav_loss(scores: torch.Tensor, codes: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SwAV's swapped prediction: scores `[V, B, K]` (every crop against the prototypes), codes
    `[G, B, K]` (Sinkhorn of the first G crops, no gradient). For each coded crop i, the mean over
    the other V − 1 crops of −Σ_k q_i log softmax(scores_v/τ), then the mean over i (the official
    normalisation). Purely local: the codes already carry the global batch."""
    views, coded = scores.shape[0], codes.shape[0]
    log_p = F.log_softmax(scores.float() / temperature, dim=-1)
    all_views = log_p.sum(dim=0)  # Σ_v log p_v: each code is then taken against the others at once
    total = scores.new_zeros((), dtype=torch.float32)
    for i in range(coded):
        others = all_views - log_p[i]
        total = total - (codes[i].float() * others).sum(dim=-1).mean() / (views - 1)
    return total / coded


def _view_weights(teacher_probs: torch.Tensor, teacher_sum: torch.Tensor, view: int) -> torch.Tensor:
    """Σ of the teacher distributions paired with student view `view` (all but its own)."""
    return teacher_sum - teacher_probs[view] if view < teacher_probs.shape[0] else teacher_sum


class _DinoCrossEntropy(torch.autograd.Function):
    """Σ over (teacher view i, student view v ≠ i) of H(t_i, softmax(s_v/τ)), mean over B, divided
    by the number of pairs, with the gradient written out: per student view v the weights are
    w_v = Σ_{i≠v} t_i, and ∂/∂s_v = (Σ_k w_v · softmax(s_v/τ) − w_v) / (τ·B·pairs). Nothing of size
    [pairs, B, K] exists, and nothing of size [views, B, K] is kept but the input."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
        views, coded = student.shape[0], teacher_probs.shape[0]
        teacher_sum = teacher_probs.sum(dim=0)  # [B, K]
        pairs = coded * views - min(coded, views)
        total = student.new_zeros((), dtype=torch.float32)
        for v in range(views):
            log_s = F.log_softmax(student[v].float() / temperature, dim=-1)
            total -= (_view_weights(teacher_probs, teacher_sum, v) * log_s).sum()
        ctx.save_for_backward(student, teacher_probs, teacher_sum)
        ctx.temperature, ctx.pairs = temperature, pairs
        return total / (pairs * student.shape[1])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        student, teacher_probs, teacher_sum = ctx.saved_tensors
        views, batch = student.shape[0], student.shape[1]
        scale = grad_output / (ctx.temperature * batch * ctx.pairs)
        grad = torch.empty_like(student)
        for v in range(views):
            weights = _view_weights(teacher_probs, teacher_sum, v)
            probs = torch.softmax(student[v].float() / ctx.temperature, dim=-1)
            grad[v] = ((weights.sum(dim=-1, keepdim=True) * probs - weights) * scale).to(grad.dtype)
        return grad, None, None


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, student_temp: float = 0.1,
              teacher_temp: float = 0.04) -> torch.Tensor:
    """DINO's self-distillation cross-entropy. student `[n_s, B, K]` logits of every crop, the
    first n_t of them the global crops the teacher saw; teacher `[n_t, B, K]` logits (no
    gradient); center `[K]`. Mean over the n_t·n_s − n_t pairs of different views of
    H(softmax((t_i − c)/τ_t), softmax(s_v/τ_s)), over the local batch.

    The cross-entropy is linear in the teacher distribution, so the sum over teacher views is
    taken first and each student view is visited once (forward and backward), instead of once
    per pair: tools/bench_losses.py measures it against the pairwise loop. Nothing crosses
    ranks here; the centre is the method's (all-reduced) state.
    """
    if student.ndim != 3 or teacher.ndim != 3 or student.shape[1:] != teacher.shape[1:]:
        raise ValueError(f"dino_loss expects student [n_s, B, K] and teacher [n_t, B, K], got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    teacher_probs = torch.softmax((teacher.detach().float() - center.float()) / teacher_temp, dim=-1)
    return _DinoCrossEntropy.apply(student, teacher_probs, student_temp)
