"""Photometric augmentation, batched on the training device with per-sample random parameters.

Colour jitter (brightness, contrast, saturation, hue in a random order per sample), grayscale,
Gaussian blur, solarize and normalisation, with the semantics of torchvision's v2 functional
ops on float images in [0, 1] (tests compare pixel for pixel). Two choices keep it fast on a
CPU as well as on a GPU:
- every op works in place on preallocated tensors: a fresh output tensor per op costs ~4× the
  op itself on a CPU (page faults), measured here;
- brightness, contrast and saturation are affine colour maps: on a GPU each step of the random
  jitter order is one batched 3 × 3 matrix product over all images; on a CPU a loop over the
  images it changes, in place, is cheaper;
- Gaussian blur is separable: two grouped 1-D convolutions with a per-image kernel, only on
  the images drawn for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class ViewSpec:
    """What is drawn for one view (its probabilities and ranges)."""

    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue
    jitter_prob: float = 0.0
    grayscale_prob: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0


@dataclass
class Params:
    """Per-sample draws; tests build them by hand to compare with the per-image reference."""

    jitter: torch.Tensor  # bool [N]
    factors: torch.Tensor  # [N, 4]: brightness, contrast, saturation factors; hue shift
    order: torch.Tensor  # long [N, 4]: a permutation of the four jitter ops
    grayscale: torch.Tensor  # bool [N]
    blur: torch.Tensor  # bool [N]
    sigma: torch.Tensor  # [N]
    solarize: torch.Tensor  # bool [N]

    def rows(self, part: slice) -> Params:
        return Params(**{f.name: getattr(self, f.name)[part] for f in fields(Params)})

    @staticmethod
    def cat(parts: list[Params]) -> Params:
        return Params(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Params)})


def sample_params(spec: ViewSpec, n: int, device: torch.device, generator: torch.Generator | None) -> Params:
    def uniform(low: float, high: float, size: tuple[int, ...] = (n,)) -> torch.Tensor:
        return torch.rand(size, device=device, generator=generator) * (high - low) + low

    def bernoulli(p: float) -> torch.Tensor:
        return torch.rand(n, device=device, generator=generator) < p

    b, c, s, h = spec.jitter
    factors = torch.stack([uniform(max(0.0, 1 - b), 1 + b), uniform(max(0.0, 1 - c), 1 + c),
                           uniform(max(0.0, 1 - s), 1 + s), uniform(-h, h)], dim=1)
    order = torch.rand((n, 4), device=device, generator=generator).argsort(dim=1)
    return Params(jitter=bernoulli(spec.jitter_prob), factors=factors, order=order,
                  grayscale=bernoulli(spec.grayscale_prob), blur=bernoulli(spec.blur_prob),
                  sigma=uniform(*spec.blur_sigma), solarize=bernoulli(spec.solarize_prob))


def _expand(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def gray(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[N, 3, H, W] → [N, 1, H, W] luma."""
    out = torch.mul(x[:, 0:1], LUMA[0], out=out)
    out.add_(x[:, 1:2], alpha=LUMA[1]).add_(x[:, 2:3], alpha=LUMA[2])
    return out


def _wrap6(k: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """k mod 6 in place, as k − 6·floor(k / 6): torch.remainder is ~12× slower on these CPUs."""
    torch.mul(k, 1 / 6, out=scratch).floor_()
    return k.sub_(scratch, alpha=6.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate the HSV hue of each [3, H, W] image by `shift` (in turns); V and chroma are kept.

    The sector masks come from `sign` of (max − channel) as 0/1 floats, and the hue is blended
    arithmetically: on a CPU, ops that read bool masks (where, masked_fill) cost 15× an add.
    HSV → RGB is closed-form: channel n ∈ {5, 3, 1} (r, g, b) = min + c·clamp(|k − 2| − 1, 0, 1)
    with k = (n + 6h) mod 6. `out` may be `x` itself: the channels are read before it is written.
    """
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    high = torch.maximum(r, g)
    high = torch.maximum(high, b, out=high)
    low = torch.minimum(r, g)
    low = torch.minimum(low, b, out=low)
    chroma = torch.sub(high, low)
    not_red = torch.sub(high, r).sign_()  # 0 where red is the largest channel, else 1
    blue = torch.sub(high, g).sign_().mul_(not_red)  # 1 where blue is largest and red, green are not
    green = not_red.sub_(blue)  # 1 where green is largest and red is not
    # Hue in sixths: (g − b)/c in red's sector, (b − r)/c + 2 in green's, (r − g)/c + 4 in blue's.
    h6 = torch.sub(g, b)
    work = torch.sub(b, r).add_(chroma, alpha=2.0).sub_(h6)
    h6.addcmul_(green, work)
    torch.sub(r, g, out=work).add_(chroma, alpha=4.0).sub_(torch.sub(g, b, out=green)).mul_(blue)
    h6.add_(work)
    # Grey pixels (c = 0) have a zero numerator: any positive divisor gives hue 0, as torchvision.
    h6.div_(torch.clamp_min(chroma, 1e-12, out=blue)).add_(6.0 * shift.view(-1, 1, 1))
    out = torch.empty_like(x) if out is None else out
    for channel, n in enumerate((5.0, 3.0, 1.0)):
        k = _wrap6(torch.add(h6, n, out=work), green)
        k.sub_(2.0).abs_().sub_(1.0).clamp_(0.0, 1.0)
        torch.addcmul(low, chroma, k, out=out[:, channel])
    return out


def _linear_step(params: Params, op: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Brightness, contrast and saturation are each a per-image affine colour map, y = M·rgb + t
    (then clamped): brightness f·I; contrast f·I + (1 − f)·mean grey; saturation
    f·I + (1 − f)·1·lumaᵀ. One step of the random order is thus one batched 3 × 3 matrix
    product for all images (identity for the rest), instead of a blend per op."""
    active = params.jitter
    bright, contrast, saturate = (active & (op == 0)), (active & (op == 1)), (active & (op == 2))
    if not bool((bright | contrast | saturate).any()):
        return None
    factor = torch.ones_like(params.factors[:, 0])
    for selected, column in ((bright, 0), (contrast, 1), (saturate, 2)):
        factor = torch.where(selected, params.factors[:, column], factor)
    n = x.shape[0]
    matrix = torch.eye(3, dtype=x.dtype, device=x.device).expand(n, 3, 3) * factor.view(n, 1, 1)
    luma = torch.tensor(LUMA, dtype=x.dtype, device=x.device)
    grey_weight = ((1 - factor) * saturate.to(x.dtype)).view(n, 1, 1)
    matrix = matrix + grey_weight * luma.view(1, 1, 3)
    offset = torch.zeros(n, 3, 1, dtype=x.dtype, device=x.device)
    if bool(contrast.any()):
        mean_grey = x.mean(dim=(2, 3)) @ luma  # the mean of the grey image, torchvision's contrast centre
        offset += ((1 - factor) * contrast.to(x.dtype) * mean_grey).view(n, 1, 1)
    return matrix, offset


def _linear_rows(x: torch.Tensor, params: Params, op: torch.Tensor) -> None:
    """One jitter step image by image, in place, touching only the images it changes: on a CPU
    ~3× cheaper than the batched matrix product, whose 3-deep products run far from memory
    speed (measured here). Same formulas as torchvision: blend with black, mean grey, grey."""
    steps = (params.jitter & (op < 3)).nonzero().squeeze(1).tolist()
    kinds, factors = op.tolist(), params.factors.tolist()
    for i in steps:
        image, factor = x[i], factors[i][kinds[i]]
        if kinds[i] == 0:
            image.mul_(factor)
        elif kinds[i] == 1:
            mean_grey = gray(image.unsqueeze(0)).mean()
            image.mul_(factor).add_(mean_grey * (1 - factor))
        else:
            grey = gray(image.unsqueeze(0))[0]  # before the image is scaled
            image.mul_(factor).add_(grey, alpha=1 - factor)
        image.clamp_(0.0, 1.0)


def color_jitter(x: torch.Tensor, params: Params, hue: bool, per_image: bool | None = None) -> torch.Tensor:
    """Brightness, contrast, saturation and hue, each sample in its own random order; samples
    without jitter (or ops with a factor of 1) pass through unchanged. The linear ops run image
    by image on a CPU (`per_image`, default: the CPU) and as one batched product on a GPU."""
    if not bool(params.jitter.any()):
        return x
    per_image = x.device.type == "cpu" if per_image is None else per_image
    x = x.contiguous()
    spare = None if per_image else torch.empty_like(x)
    for step in range(4):
        op = params.order[:, step]
        if per_image:
            _linear_rows(x, params, op)
        elif (linear := _linear_step(params, op, x)) is not None:
            matrix, offset = linear
            flat = spare.view(x.shape[0], 3, -1)
            torch.baddbmm(offset, matrix, x.view(x.shape[0], 3, -1), out=flat).clamp_(0.0, 1.0)
            x, spare = spare, x
        if hue:
            rotate = (params.jitter & (op == 3)).nonzero().squeeze(1)
            # Large images in place, one by one, without gathering them and scattering them back;
            # small ones (multi-crop's local crops) together, where per-call overhead dominates.
            if per_image and x.shape[-2] * x.shape[-1] >= 2**15:
                for i in rotate.tolist():
                    adjust_hue(x[i : i + 1], params.factors[i : i + 1, 3], out=x[i : i + 1])
            elif len(rotate):
                x[rotate] = adjust_hue(x[rotate], params.factors[rotate, 3])
    return x


def to_grayscale(x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    index = selected.nonzero().squeeze(1)
    if len(index):
        x[index] = gray(x[index]).expand(-1, 3, -1, -1)
    return x


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """[N, size] normalised 1-D Gaussians sampled at integer offsets, torchvision's kernel."""
    offsets = torch.arange(size, device=sigma.device, dtype=sigma.dtype) - (size - 1) / 2
    kernel = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2)
    return kernel / kernel.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding and one sigma per image: two grouped
    1-D convolutions (every channel of every image its own group). Measured on these CPUs:
    1.5 ms for a 224 px image with 23 taps, against 6–10 ms for a per-sample loop, shifted
    multiply-adds, banded matmuls or an FFT."""
    n, channels, height, width = x.shape
    pad = kernel_size // 2
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect").reshape(1, n * channels, height + 2 * pad,
                                                                        width + 2 * pad)
    weights = gaussian_kernels(sigma.to(x.dtype), kernel_size).repeat_interleave(channels, dim=0)
    vertical = F.conv2d(padded, weights.view(n * channels, 1, kernel_size, 1), groups=n * channels)
    out = F.conv2d(vertical, weights.view(n * channels, 1, 1, kernel_size), groups=n * channels)
    return out.view(n, channels, height, width)


BLUR_CHUNK_PIXELS = 2**18  # images per convolution call: ~1 MB of float input keeps it in cache


def blur_selected(x: torch.Tensor, selected: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur the selected images a few at a time: on a CPU one grouped convolution over a whole
    batch of 224 px images is ~1.7× slower per image than over 4 of them (cache), measured here."""
    index = selected.nonzero().squeeze(1)
    if not len(index) or kernel_size <= 1:
        return x
    chunk = max(1, BLUR_CHUNK_PIXELS // (x.shape[-2] * x.shape[-1]))
    for part in index.split(chunk):
        x[part] = gaussian_blur(x[part], sigma[part], kernel_size)
    return x


def solarize(x: torch.Tensor, selected: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Invert the pixels at or above `threshold` in the selected images."""
    index = selected.nonzero().squeeze(1)
    if len(index):
        part = x[index]
        if threshold == 0.5:  # x ≥ ½ ⇔ 1 − x ≤ x: a minimum, without a bool mask
            x[index] = torch.minimum(part, 1.0 - part)
        else:
            x[index] = torch.where(part >= threshold, 1.0 - part, part)
    return x


def blur_kernel_size(side: int, sigma_max: float, fraction: float = 0.1) -> int:
    """Odd kernel of `fraction` of the side (SimCLR: 10 %), never under ±3 sigma."""
    size = max(3, int(fraction * side), 2 * math.ceil(3 * sigma_max) + 1)
    return size if size % 2 else size + 1


def augment(x: torch.Tensor, params: Params, blur_kernel: int, grayscale_first: bool = False,
            solarize_threshold: float = 0.5, per_image: bool | None = None) -> torch.Tensor:
    """The photometric chain on float images [N, 3, H, W] in [0, 1], in place where possible."""
    hue = bool((params.factors[:, 3] != 0).any())
    if grayscale_first:  # InstDisc / MoCo v1 order: grey first, then jitter
        x = to_grayscale(x, params.grayscale)
    x = color_jitter(x, params, hue, per_image)
    if not grayscale_first:
        x = to_grayscale(x, params.grayscale)
    x = blur_selected(x, params.blur, params.sigma, blur_kernel)
    return solarize(x, params.solarize, solarize_threshold)
