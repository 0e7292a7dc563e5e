"""Losses against soft targets the method computes itself: SwAV's Sinkhorn codes and DINO's
centred, sharpened teacher."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bigssl.distributed import comm


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
