"""The non-contrastive and distillation losses against their formulas written out plainly, and
their cross-rank behaviour: 2 processes × B equal 1 process × 2B."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import run_distributed, run_threaded

from bigssl import losses
from bigssl.distributed import comm


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_info_nce_in_batch_keys_matches_the_formula():
    q, k, tau = _rand(5, 4, seed=0), _rand(5, 4, seed=1), 0.2
    qs, ks = [_unit(r) for r in q.tolist()], [_unit(r) for r in k.tolist()]
    expected = 0.0
    for i in range(5):
        logits = [_dot(qs[i], ks[j]) / tau for j in range(5)]
        expected -= logits[i] - math.log(sum(math.exp(x) for x in logits))
    assert losses.info_nce(q, k, tau).item() == pytest.approx(expected / 5, rel=1e-5)


def test_info_nce_with_a_queue_matches_the_formula():
    q, k, tau = _rand(3, 4, seed=2), _rand(3, 4, seed=3), 0.07
    queue = torch.nn.functional.normalize(_rand(6, 4, seed=4), dim=1)
    expected = 0.0
    for i in range(3):
        qi, ki = _unit(q[i].tolist()), _unit(k[i].tolist())
        logits = [_dot(qi, ki) / tau] + [_dot(qi, n) / tau for n in queue.tolist()]
        expected -= logits[0] - math.log(sum(math.exp(x) for x in logits))
    assert losses.info_nce(q, k, tau, queue=queue).item() == pytest.approx(expected / 3, rel=1e-5)


def test_cosine_losses_match_their_formulas():
    p, z = _rand(4, 3, seed=5), _rand(4, 3, seed=6)
    cosines = [_dot(_unit(a), _unit(b)) for a, b in zip(p.tolist(), z.tolist(), strict=True)]
    assert losses.negative_cosine(p, z).item() == pytest.approx(-sum(cosines) / 4, rel=1e-6)
    # BYOL: the squared distance of the normalised vectors
    squared = [sum((x - y) ** 2 for x, y in zip(_unit(a), _unit(b), strict=True)) for a, b in zip(p.tolist(),
                                                                                                    z.tolist(),
                                                                                                    strict=True)]
    assert losses.normalized_mse(p, z).item() == pytest.approx(sum(squared) / 4, rel=1e-5)


def _barlow_plain(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> float:
    n, d = z1.shape

    def standardized(z):
        cols = []
        for j in range(d):
            column = [z[b][j] for b in range(n)]
            mean = sum(column) / n
            var = sum((x - mean) ** 2 for x in column) / n
            cols.append([(x - mean) / math.sqrt(var + 1e-5) for x in column])
        return cols  # [d][n]

    a, b = standardized(z1.tolist()), standardized(z2.tolist())
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[i][s] * b[j][s] for s in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lambd * c * c
    return loss


def test_barlow_twins_matches_the_formula():
    z1, z2 = _rand(8, 5, seed=7), _rand(8, 5, seed=8)
    assert losses.barlow_twins_loss(z1, z2, lambd=0.01).item() == pytest.approx(_barlow_plain(z1, z2, 0.01),
                                                                                 rel=1e-5)


def _sinkhorn_plain(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    q = torch.exp(scores.double() / epsilon).T
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).T


def test_sinkhorn_matches_the_plain_iteration_and_balances_prototypes():
    scores = torch.nn.functional.normalize(_rand(16, 6, seed=9), dim=1) @ torch.nn.functional.normalize(
        _rand(5, 6, seed=10), dim=1).T  # cosine scores, [B=16, K=5]
    codes = losses.sinkhorn(scores, epsilon=0.05, iterations=3)
    torch.testing.assert_close(codes.double(), _sinkhorn_plain(scores, 0.05, 3), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(16))  # each sample: a distribution
    many = losses.sinkhorn(scores, epsilon=0.05, iterations=50)
    torch.testing.assert_close(many.sum(dim=0), torch.full((5,), 16 / 5), atol=1e-3, rtol=0)  # equipartition


def test_sinkhorn_is_finite_for_bf16_scores_and_tiny_epsilon():
    scores = (_rand(32, 100, seed=11) * 3).bfloat16()  # exp(3/0.01) overflows fp32 without the shift
    codes = losses.sinkhorn(scores, epsilon=0.01, iterations=3)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(32))
    # The official iteration in float64 plain exponentials (exp(300) is finite there), scores shifted
    # by their maximum first (a constant factor the first normalisation removes).
    x = scores.double()
    q = torch.exp((x - x.max()) / 0.01).T
    q /= q.sum()
    for _ in range(3):
        q /= q.sum(dim=1, keepdim=True) * 100
        q /= q.sum(dim=0, keepdim=True) * 32
    torch.testing.assert_close(codes.double(), (q * 32).T, rtol=1e-4, atol=1e-6)


def test_swav_loss_matches_the_double_loop():
    scores, tau = _rand(4, 3, 6, seed=12), 0.1
    codes = torch.softmax(_rand(2, 3, 6, seed=13), dim=-1)
    log_p = torch.log_softmax(scores.double() / tau, dim=-1)
    expected = 0.0
    for i in range(2):
        subloss = 0.0
        for v in range(4):
            if v != i:
                subloss += -(codes[i].double() * log_p[v]).sum(dim=-1).mean().item()
        expected += subloss / 3
    assert losses.swav_loss(scores, codes, tau).item() == pytest.approx(expected / 2, rel=1e-5)


def _dino_pairwise(student, teacher, center, student_temp, teacher_temp):
    t = torch.softmax((teacher - center) / teacher_temp, dim=-1)
    total, pairs = 0.0, 0
    for i in range(teacher.shape[0]):
        for v in range(student.shape[0]):
            if v == i:
                continue
            total = total + (-t[i] * torch.log_softmax(student[v] / student_temp, dim=-1)).sum(dim=-1).mean()
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("views", [2, 6])
def test_dino_loss_and_its_gradient_match_the_pairwise_loop(views: int):
    student = _rand(views, 4, 32, seed=14).double().requires_grad_(True)
    teacher, center = _rand(2, 4, 32, seed=15).double(), _rand(32, seed=16).double() * 0.1
    fused = losses.dino_loss(student, teacher, center, 0.1, 0.04)
    (fused_grad,) = torch.autograd.grad(fused, student)
    plain = _dino_pairwise(student, teacher, center, 0.1, 0.04)
    (plain_grad,) = torch.autograd.grad(plain, student)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    torch.testing.assert_close(fused_grad.double(), plain_grad, atol=1e-7, rtol=1e-5)


def test_dino_loss_of_uniform_predictions_is_ln_k():
    k = 64
    uniform = torch.zeros(4, 3, k)
    assert losses.dino_loss(uniform, uniform[:2], torch.zeros(k)).item() == pytest.approx(math.log(k), rel=1e-6)


# ---------------------------------------------------------------- 2 ranks × B == 1 rank × 2B
B, D, K = 6, 5, 7


def _inputs() -> dict[str, torch.Tensor]:
    return {"z1": _rand(2 * B, D, seed=20), "z2": _rand(2 * B, D, seed=21), "scores": _rand(2 * B, K, seed=22)}


def _losses_on(z1, z2, scores, differentiable: bool = True) -> dict[str, torch.Tensor]:
    z1, z2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    barlow = losses.barlow_twins_loss(z1, z2, differentiable_reduce=differentiable)
    barlow.backward()
    q = z1.detach().clone().requires_grad_(True)
    nce = losses.info_nce(q, z2.detach(), 0.2)
    nce.backward()
    return {"barlow": barlow.detach(), "barlow_grad": z1.grad.clone(), "nce": nce.detach(),
            "nce_grad": q.grad.clone(), "codes": losses.sinkhorn(scores)}


def _rank_losses(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    assert comm.world_size() == world_size == 2
    inputs = {name: t[rank * B : (rank + 1) * B] for name, t in _inputs().items()}
    result = _losses_on(**inputs)
    official = _losses_on(**inputs, differentiable=False)
    result["official_barlow"], result["official_barlow_grad"] = official["barlow"], official["barlow_grad"]
    return result


def _worker(rank: int, world_size: int, out: Path) -> None:
    torch.save(_rank_losses(rank, world_size), out / f"rank{rank}.pt")


@pytest.mark.parametrize("ranks_as", ["threads", pytest.param("processes", marks=pytest.mark.distributed)])
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path: Path, ranks_as: str):
    """Two gloo processes, and (fast, one process: the unit test of each collective's part) two
    ranks as threads of this process in torch's threaded group: without the all-reduces of
    Sinkhorn's marginals, of Barlow's C or the gather of InfoNCE's keys a rank's numbers are its
    half batch's alone."""
    if ranks_as == "processes":
        run_distributed(_worker, 2, tmp_path)
        ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    else:
        ranks = run_threaded(_rank_losses, 2)
    single = _losses_on(**_inputs())
    for rank, result in enumerate(ranks):
        rows = slice(rank * B, (rank + 1) * B)
        # Barlow Twins: one global C; gradients are W × the single-process ones before the engine's
        # average over ranks, which the W-rank gradient of a replicated parameter then equals.
        assert result["barlow"].item() == pytest.approx(single["barlow"].item(), rel=1e-5)
        torch.testing.assert_close(result["barlow_grad"] / 2, single["barlow_grad"][rows], atol=1e-6, rtol=1e-4)
        # The official non-differentiable reduce: same value, and each rank's samples get 1 × (not
        # W ×) their single-process gradient (SyncBN's backward still spans ranks), so after the
        # engine's average a replicated parameter gets 1/W of the single-process gradient.
        assert result["official_barlow"].item() == pytest.approx(single["barlow"].item(), rel=1e-5)
        torch.testing.assert_close(result["official_barlow_grad"], single["barlow_grad"][rows], atol=1e-6,
                                   rtol=1e-4)
        # MoCo v3's InfoNCE: each rank's queries against the gathered keys; loss = mean of ranks'.
        torch.testing.assert_close(result["nce_grad"] / 2, single["nce_grad"][rows], atol=1e-6, rtol=1e-4)
        # Sinkhorn: the marginals span the global batch, so each rank's codes are its rows.
        torch.testing.assert_close(result["codes"], single["codes"][rows], atol=1e-6, rtol=1e-5)
    mean_nce = (ranks[0]["nce"] + ranks[1]["nce"]) / 2
    assert mean_nce.item() == pytest.approx(single["nce"].item(), rel=1e-5)
