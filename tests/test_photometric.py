"""Batched photometric ops against torchvision's per-image v2 functional ops, and the
statistics of their random draws."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from bigssl.data import photometric as ph
from bigssl.data.views import rgb_to_lab

JITTER_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def reference(x: torch.Tensor, params: ph.Params, kernel: int, grayscale_first: bool) -> torch.Tensor:
    """The per-image pipeline written with torchvision's functional ops, one image at a time."""
    out = []
    for i, image in enumerate(x):
        image = image.clone()
        if grayscale_first and params.grayscale[i]:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        if params.jitter[i]:
            for op in params.order[i].tolist():
                image = JITTER_OPS[op](image, params.factors[i, op].item())
        if not grayscale_first and params.grayscale[i]:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        if params.blur[i]:
            image = TF.gaussian_blur(image, [kernel, kernel], [params.sigma[i].item()] * 2)
        if params.solarize[i]:
            image = TF.solarize(image, 0.5)
        out.append(image)
    return torch.stack(out)


@pytest.mark.parametrize("per_image", [True, False], ids=["cpu-path", "gpu-path"])
@pytest.mark.parametrize(("size", "kernel", "grayscale_first"), [((3, 32, 40), 13, False), ((3, 24, 24), 5, True),
                                                                ((3, 184, 184), 19, False)])  # ≥ 2¹⁵ px: hue in place
def test_batched_ops_equal_the_per_image_reference(size, kernel: int, grayscale_first: bool, per_image: bool):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((48, *size), generator=generator)
    spec = ph.ViewSpec(jitter=(0.8, 0.8, 0.8, 0.2), jitter_prob=0.8, grayscale_prob=0.3, blur_prob=0.5,
                       solarize_prob=0.3)
    params = ph.sample_params(spec, 48, torch.device("cpu"), generator)
    assert params.jitter.any() and params.grayscale.any() and params.blur.any() and params.solarize.any()
    ours = ph.augment(x.clone(), params, kernel, grayscale_first, per_image=per_image)
    torch.testing.assert_close(ours, reference(x, params, kernel, grayscale_first), atol=2e-5, rtol=1e-5)


def test_each_op_alone_matches_torchvision():
    generator = torch.Generator().manual_seed(1)
    x = torch.rand((16, 3, 20, 30), generator=generator)
    shift = torch.rand(16, generator=generator) - 0.5
    expected = torch.stack([TF.adjust_hue(im, s.item()) for im, s in zip(x, shift, strict=True)])
    # Pixels in [0, 1]: rounding is relative to the range, and hue's division by max − min
    # magnifies it (measured: 9.5e-7, 8 ulp of 1.0, on every SIMD level and thread count tried).
    torch.testing.assert_close(ph.adjust_hue(x.clone(), shift), expected, atol=5e-6, rtol=1e-5)
    # 8-bit pixels tie often: grey pixels and two equal largest channels pick the sector as torchvision.
    levels = torch.randint(0, 4, (16, 3, 20, 30), generator=generator).float() / 3
    expected = torch.stack([TF.adjust_hue(im, s.item()) for im, s in zip(levels, shift, strict=True)])
    torch.testing.assert_close(ph.adjust_hue(levels.clone(), shift), expected, atol=5e-6, rtol=1e-5)
    sigma = torch.rand(16, generator=generator) * 1.9 + 0.1
    expected = torch.stack([TF.gaussian_blur(im, [9, 9], [s.item()] * 2) for im, s in zip(x, sigma, strict=True)])
    torch.testing.assert_close(ph.gaussian_blur(x.clone(), sigma, 9), expected, atol=2e-6, rtol=1e-5)
    gray = ph.gray(x)
    torch.testing.assert_close(gray, TF.rgb_to_grayscale(x), atol=1e-6, rtol=1e-6)  # weights 0.3/0.59/0.11: 4e-3 off


def test_untouched_samples_pass_through_bit_for_bit():
    x = torch.rand((8, 3, 16, 16), generator=torch.Generator().manual_seed(2))
    params = ph.sample_params(ph.ViewSpec(jitter=(0.4, 0.4, 0.4, 0.1)), 8, torch.device("cpu"), None)
    assert torch.equal(ph.augment(x.clone(), params, 5), x)  # every probability is 0


def test_random_draws_follow_the_configured_probabilities_and_ranges():
    n = 20000
    spec = ph.ViewSpec(jitter=(0.4, 0.3, 0.2, 0.1), jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5,
                       blur_sigma=(0.1, 2.0), solarize_prob=0.2)
    params = ph.sample_params(spec, n, torch.device("cpu"), torch.Generator().manual_seed(3))

    def within(successes: torch.Tensor, p: float) -> bool:  # 5 standard deviations of a binomial
        return abs(successes.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)

    assert within(params.jitter, 0.8) and within(params.grayscale, 0.2)
    assert within(params.blur, 0.5) and within(params.solarize, 0.2)
    for column, (low, high) in enumerate([(0.6, 1.4), (0.7, 1.3), (0.8, 1.2), (-0.1, 0.1)]):
        values = params.factors[:, column]
        assert low <= values.min() and values.max() <= high
        assert abs(values.mean().item() - (low + high) / 2) < 5 * (high - low) / math.sqrt(12 * n)
    assert params.sigma.min() >= 0.1 and params.sigma.max() <= 2.0
    counts = torch.tensor([(params.order == torch.tensor(p)).all(dim=1).sum().item()
                           for p in itertools.permutations(range(4))])
    assert counts.sum() == n and (counts - n / 24).abs().max() < 5 * math.sqrt(n / 24)  # every order alike


def test_lab_matches_scikit_image():
    color = pytest.importorskip("skimage.color")
    x = torch.rand((2, 3, 8, 9), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    expected = torch.stack([torch.from_numpy(color.rgb2lab(im.permute(1, 2, 0).numpy())).permute(2, 0, 1)
                            for im in x])
    torch.testing.assert_close(rgb_to_lab(x), expected, atol=1e-3, rtol=0)
