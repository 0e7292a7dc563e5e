"""InvaSpread's and InstDisc's losses against their formulas written out plainly, and InvaSpread
across ranks: 2 processes × B give 1 process × 2B (value and per-sample gradients)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import run_distributed

from bigssl import losses
from bigssl.distributed import comm

B, D = 5, 4


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _invaspread_plain(f: torch.Tensor, f_hat: torch.Tensor, tau: float) -> float:
    """Ye et al. eq. 5 over the 2N features, each anchor's softmax over the other 2N − 1."""
    feats = [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in torch.cat([f, f_hat]).tolist()]
    n = len(f)
    total = 0.0
    for a in range(2 * n):
        others = [k for k in range(2 * n) if k != a]
        exps = {k: math.exp(sum(x * y for x, y in zip(feats[a], feats[k], strict=True)) / tau) for k in others}
        denominator = sum(exps.values())
        positive = (a + n) % (2 * n)
        total -= math.log(exps[positive] / denominator)
        total -= sum(math.log(1 - exps[k] / denominator) for k in others if k != positive)
    return total / (2 * n)


def test_invaspread_matches_the_formula():
    f, f_hat = _rand(B, D, seed=0), _rand(B, D, seed=1)
    assert losses.invaspread_loss(f, f_hat, 0.5).item() == pytest.approx(_invaspread_plain(f, f_hat, 0.5), rel=1e-5)


def test_invaspread_gradient_flows_through_anchors_only():
    """The candidate side is detached (official code): the gradient of sample i's feature is the
    derivative of its own two anchor rows, with every other feature held fixed."""
    f, f_hat = _rand(B, D, seed=2).requires_grad_(True), _rand(B, D, seed=3)
    losses.invaspread_loss(f, f_hat, 0.5).backward()
    i = 1
    row = f[i].detach().clone().requires_grad_(True)

    def anchor_terms(anchor: torch.Tensor) -> torch.Tensor:  # only row i's own terms depend on it
        a = torch.nn.functional.normalize(anchor, dim=0)
        candidates = torch.nn.functional.normalize(torch.cat([f.detach(), f_hat]), dim=1)
        logits = candidates @ a / 0.5
        logits[i] = float("-inf")
        log_p = logits - torch.logsumexp(logits, dim=0)
        negatives = [k for k in range(2 * B) if k not in (i, B + i)]
        return -(log_p[B + i] + torch.log1p(-log_p[negatives].exp()).sum()) / (2 * B)

    anchor_terms(row).backward()
    torch.testing.assert_close(f.grad[i], row.grad, atol=1e-6, rtol=1e-5)


def test_nce_loss_matches_the_formula():
    scores, z, population = _rand(3, 5, seed=4), 7.5, 100
    expected = 0.0
    for row in scores.tolist():
        h = [(math.exp(s) / z) / (math.exp(s) / z + 4 / population) for s in row]
        expected -= math.log(h[0]) + sum(math.log(1 - x) for x in h[1:])
    assert losses.nce_loss(scores, math.log(z), population).item() == pytest.approx(expected / 3, rel=1e-5)


def _invaspread_with_grads(f: torch.Tensor, f_hat: torch.Tensor) -> dict[str, torch.Tensor]:
    f, f_hat = f.clone().requires_grad_(True), f_hat.clone().requires_grad_(True)
    loss = losses.invaspread_loss(f, f_hat, 0.3)
    loss.backward()
    return {"loss": loss.detach(), "grad": f.grad, "grad_hat": f_hat.grad}


def _worker(rank: int, world_size: int, out: Path) -> None:
    assert comm.world_size() == world_size == 2
    f, f_hat = _rand(2 * B, D, seed=5), _rand(2 * B, D, seed=6)
    rows = slice(rank * B, (rank + 1) * B)
    torch.save(_invaspread_with_grads(f[rows], f_hat[rows]), out / f"rank{rank}.pt")


@pytest.mark.distributed
def test_invaspread_on_two_ranks_equals_one_process(tmp_path: Path):
    run_distributed(_worker, 2, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _invaspread_with_grads(_rand(2 * B, D, seed=5), _rand(2 * B, D, seed=6))
    assert ((ranks[0]["loss"] + ranks[1]["loss"]) / 2).item() == pytest.approx(single["loss"].item(), rel=1e-5)
    for rank, result in enumerate(ranks):  # W × the per-sample gradient before the engine's average
        rows = slice(rank * B, (rank + 1) * B)
        torch.testing.assert_close(result["grad"] / 2, single["grad"][rows], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(result["grad_hat"] / 2, single["grad_hat"][rows], atol=1e-6, rtol=1e-4)


def _clip_plain(image: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    unit = lambda rows: [[x / math.sqrt(sum(y * y for y in r)) for x in r] for r in rows.tolist()]  # noqa: E731
    images, texts = unit(image), unit(text)
    n = len(images)
    logits = [[scale * sum(a * b for a, b in zip(images[i], texts[j], strict=True)) for j in range(n)]
              for i in range(n)]
    rows = sum(math.log(sum(math.exp(x) for x in logits[i])) - logits[i][i] for i in range(n)) / n
    columns = sum(math.log(sum(math.exp(logits[j][i]) for j in range(n))) - logits[i][i] for i in range(n)) / n
    return (rows + columns) / 2


def test_clip_loss_matches_the_formula():
    image, text = _rand(B, D, seed=7), _rand(B, D, seed=8)
    assert losses.clip_loss(image, text, 14.0).item() == pytest.approx(_clip_plain(image, text, 14.0), rel=1e-5)


def _clip_with_grads(image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
    image, text = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
    log_scale = torch.tensor(2.0, requires_grad=True)
    loss = losses.clip_loss(image, text, log_scale.exp())
    loss.backward()
    return {"loss": loss.detach(), "image": image.grad, "text": text.grad, "scale": log_scale.grad}


def _clip_worker(rank: int, world_size: int, out: Path) -> None:
    assert comm.world_size() == world_size == 2
    image, text = _rand(2 * B, D, seed=9), _rand(2 * B, D, seed=10)
    rows = slice(rank * B, (rank + 1) * B)
    torch.save(_clip_with_grads(image[rows], text[rows]), out / f"rank{rank}.pt")


@pytest.mark.distributed
def test_clip_loss_on_two_ranks_equals_one_process(tmp_path: Path):
    """Both sides gathered with gradient: the mean of the ranks' losses is the global loss, and
    every gradient (embeddings and the temperature) is W × the one-process one before the
    engine averages over ranks."""
    run_distributed(_clip_worker, 2, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _clip_with_grads(_rand(2 * B, D, seed=9), _rand(2 * B, D, seed=10))
    assert ((ranks[0]["loss"] + ranks[1]["loss"]) / 2).item() == pytest.approx(single["loss"].item(), rel=1e-5)
    assert ((ranks[0]["scale"] + ranks[1]["scale"]) / 2).item() == pytest.approx(single["scale"].item(), rel=1e-4)
    for rank, result in enumerate(ranks):
        rows = slice(rank * B, (rank + 1) * B)
        torch.testing.assert_close(result["image"] / 2, single["image"][rows], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(result["text"] / 2, single["text"][rows], atol=1e-6, rtol=1e-4)


def _multiview_plain(views: list[torch.Tensor], tau: float) -> float:
    """Every anchor (view v of image i) against every other view in the batch; the mean over its
    V − 1 positives (the other views of image i) of −log softmax, averaged over the V·N anchors."""
    unit = [[[x / math.sqrt(sum(y * y for y in r)) for x in r] for r in v.tolist()] for v in views]
    count, n = len(unit), len(unit[0])
    total, terms = 0.0, 0
    for v in range(count):
        for i in range(n):
            sim = {(w, j): sum(a * b for a, b in zip(unit[v][i], unit[w][j], strict=True)) / tau
                   for w in range(count) for j in range(n) if (w, j) != (v, i)}
            log_denominator = math.log(sum(math.exp(s) for s in sim.values()))
            for w in range(count):
                if w != v:
                    total -= sim[(w, i)] - log_denominator
                    terms += 1
    return total / terms


def test_multiview_nt_xent_matches_the_formula_and_is_nt_xent_for_two_views():
    views = [_rand(B, D, seed=20 + v) for v in range(4)]
    for count in (3, 4):
        value = losses.multiview_nt_xent(views[:count], 0.3).item()
        assert value == pytest.approx(_multiview_plain(views[:count], 0.3), rel=1e-5)
    two = losses.multiview_nt_xent(views[:2], 0.3).item()
    assert two == pytest.approx(losses.nt_xent(views[0], views[1], 0.3).item(), rel=1e-6)
    assert two == pytest.approx(_multiview_plain(views[:2], 0.3), rel=1e-5)
    with pytest.raises(ValueError, match="two or more"):
        losses.multiview_nt_xent(views[:1], 0.3)


def _multiview_with_grads(views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    views = [v.clone().requires_grad_(True) for v in views]
    loss = losses.multiview_nt_xent(views, 0.2)
    loss.backward()
    return {"loss": loss.detach(), "grads": torch.stack([v.grad for v in views])}


def _multiview_worker(rank: int, world_size: int, out: Path) -> None:
    assert comm.world_size() == world_size == 2
    rows = slice(rank * B, (rank + 1) * B)
    torch.save(_multiview_with_grads([_rand(2 * B, D, seed=30 + v)[rows] for v in range(3)]), out / f"rank{rank}.pt")


@pytest.mark.distributed
def test_multiview_nt_xent_on_two_ranks_equals_one_process(tmp_path: Path):
    """Candidates gathered with gradient: the ranks' mean loss is the global one, and each rank's
    gradients are W × its rows of the one-process gradients (before the engine's average)."""
    run_distributed(_multiview_worker, 2, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _multiview_with_grads([_rand(2 * B, D, seed=30 + v) for v in range(3)])
    assert ((ranks[0]["loss"] + ranks[1]["loss"]) / 2).item() == pytest.approx(single["loss"].item(), rel=1e-5)
    for rank, result in enumerate(ranks):
        rows = slice(rank * B, (rank + 1) * B)
        torch.testing.assert_close(result["grads"] / 2, single["grads"][:, rows], atol=1e-6, rtol=1e-4)
