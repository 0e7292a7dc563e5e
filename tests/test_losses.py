import math

import pytest
import torch

from bigssl import losses


def nt_xent_by_formula(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """SimCLR eq. 1 written out: 2N views, each anchor against every other view."""
    views = [v / v.norm() for v in torch.cat([z1, z2]).double()]
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        numerator = math.exp(float(views[i] @ views[positive]) / tau)
        denominator = sum(math.exp(float(views[i] @ views[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(numerator / denominator)
    return total / (2 * n)


def test_nt_xent_matches_formula():
    generator = torch.Generator().manual_seed(0)
    for batch, dim, tau in [(4, 8, 0.1), (7, 3, 0.5), (16, 32, 0.07)]:
        z1 = torch.randn(batch, dim, generator=generator)
        z2 = torch.randn(batch, dim, generator=generator)
        got = losses.nt_xent(z1, z2, temperature=tau, gather=False).item()
        assert abs(got - nt_xent_by_formula(z1, z2, tau)) < 1e-4 * max(1.0, abs(got))


def test_nt_xent_is_low_for_matching_views_and_scale_invariant():
    z = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    aligned = losses.nt_xent(z, z.clone(), 0.1, gather=False)
    shuffled = losses.nt_xent(z, z.roll(1, dims=0), 0.1, gather=False)
    assert aligned.item() == pytest.approx(nt_xent_by_formula(z, z.clone(), 0.1), rel=1e-5)
    assert shuffled.item() == pytest.approx(nt_xent_by_formula(z, z.roll(1, dims=0), 0.1), rel=1e-5)
    assert aligned < shuffled
    # Inputs are normalised inside: scaling a projection changes nothing.
    torch.testing.assert_close(losses.nt_xent(3 * z, z, 0.1, gather=False), aligned, rtol=1e-5, atol=1e-7)


def test_nt_xent_rejects_mismatched_shapes():
    try:
        losses.nt_xent(torch.zeros(4, 8), torch.zeros(5, 8))
    except ValueError as err:
        assert "[B, D]" in str(err)
    else:
        raise AssertionError("expected a ValueError")
