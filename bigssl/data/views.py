"""View policies, split where the work is cheapest.

- `Geometry` runs in the data workers: one decoded uint8 image in, every crop of it out
  (crop, resize, flip), grouped by resolution: a list of uint8 tensors [V, C, S, S], one per
  group (global crops, local crops, CPC patches).
- `Photometric` runs batched on the training device: colour jitter, grayscale, blur, solarize,
  colour space and normalisation with per-sample random draws; it turns the collated uint8
  groups [B, V, C, S, S] into float groups [V, B, C, S, S] whose `flatten(0, 1)` is a
  channels-last [V·B, C, S, S] batch ready for the backbone.

Policy settings come from `data.views` (bigssl/methods/policies.py has the published values),
resolved before anything here runs: what the views are (`crop`, `color_space`, `channel_split`)
is read from those fields, never from the policy's name, so no code here knows a method.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torchvision

from bigssl.config import ViewsConfig
from bigssl.data import geometry as geo
from bigssl.data import photometric as ph

LAB_CENTER = (50.0, (98.233 - 86.183) / 2, (94.478 - 107.857) / 2)  # middle of sRGB's L, a, b ranges
LAB_HALF_RANGE = (50.0, (98.233 + 86.183) / 2, (94.478 + 107.857) / 2)


def _per_view(values: list[float], count: int) -> list[float]:
    """One value per view; a shorter list repeats its last value."""
    return [values[min(i, len(values) - 1)] for i in range(count)]


class Geometry:
    """The worker half of a policy: uint8 [C, H, W] → list of uint8 groups [V, C, S, S]."""

    def __init__(self, views: ViewsConfig) -> None:
        self.views = views

    def _crops(self, image: torch.Tensor, count: int, size: int, scale: list[float],
               rng: random.Random) -> torch.Tensor:
        v = self.views
        height, width = image.shape[-2:]
        out = []
        for _ in range(count):
            box = geo.random_resized_crop_box(height, width, tuple(scale), tuple(v.crop_ratio), rng)
            out.append(geo.crop_resize(image, box, size, v.interpolation, flip=rng.random() < v.flip_prob))
        return torch.stack(out)

    def __call__(self, image: torch.Tensor, rng: random.Random | None = None) -> list[torch.Tensor]:
        """`rng` draws every random choice (the training stream gives each sample its own, so a
        sample's views do not depend on what the worker read before it); Python's global one if None."""
        v = self.views
        rng = rng or random  # the module offers the same draws as a Random
        batch = geo.as_batch(image)
        if v.crop == "patch_grid":
            resized = geo.resize_short_side(batch, v.resize, v.interpolation)
            box = geo.random_box(*resized.shape[-2:], v.size, rng)
            crop = geo.crop_resize(resized, box, v.size, flip=rng.random() < v.flip_prob)
            return [geo.patch_grid(geo.as_batch(crop), v.grid, v.patch, v.patch_jitter, rng)]
        if v.crop == "random_square":
            resized = geo.resize_short_side(batch, v.resize, v.interpolation)
            box = geo.random_box(*resized.shape[-2:], v.size, rng)
            return [geo.crop_resize(resized, box, v.size).unsqueeze(0)]
        groups = [self._crops(batch, v.views, v.size, v.crop_scale, rng)]
        if v.local_crops:
            groups.append(self._crops(batch, v.local_crops, v.local_size, v.local_crop_scale, rng))
        return groups


class EvalGeometry:
    """Deterministic view for feature extraction: short side to `resize`, centre crop `size`."""

    def __init__(self, views: ViewsConfig) -> None:
        self.views = views

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        v = self.views
        resized = geo.resize_short_side(geo.as_batch(image), v.resize, v.interpolation)
        return geo.crop_resize(resized, geo.center_box(*resized.shape[-2:], v.size), v.size)


@dataclass(frozen=True)
class GroupSpec:
    views: tuple[ph.ViewSpec, ...]
    blur_kernel: int
    grayscale_first: bool = False
    output: str = "rgb"  # rgb | lab
    channel_split: tuple[int, ...] = ()  # channels of each view given as views of their own, e.g. L and ab


def group_specs(v: ViewsConfig) -> list[GroupSpec]:
    def spec(blur: float, solarize: float) -> ph.ViewSpec:
        return ph.ViewSpec(jitter=tuple(v.jitter), jitter_prob=v.jitter_prob, grayscale_prob=v.grayscale_prob,
                           blur_prob=blur, blur_sigma=tuple(v.blur_sigma), solarize_prob=solarize)

    if v.crop == "patch_grid":  # every patch draws its own colour dropping
        patch_spec = spec(_per_view(v.blur_prob, 1)[0], _per_view(v.solarize_prob, 1)[0])
        return [GroupSpec((patch_spec,) * v.grid**2, ph.blur_kernel_size(v.patch, v.blur_sigma[1]))]
    blur, solar = _per_view(v.blur_prob, v.views), _per_view(v.solarize_prob, v.views)
    groups = [GroupSpec(tuple(spec(b, s) for b, s in zip(blur, solar, strict=True)),
                        ph.blur_kernel_size(v.size, v.blur_sigma[1]), v.grayscale_first,
                        v.color_space or "rgb", tuple(v.channel_split or ()))]
    # Local crops stay RGB, one view each: the colour space and split are the global crops'.
    if v.local_crops:
        groups.append(GroupSpec((spec(v.local_blur_prob, v.local_solarize_prob),) * v.local_crops,
                                ph.blur_kernel_size(v.local_size, v.blur_sigma[1]), v.grayscale_first))
    return groups


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] → CIE Lab (D65), [N, 3, H, W]."""
    linear = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    matrix = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                           [0.019334, 0.119193, 0.950227]], device=x.device, dtype=x.dtype)
    white = torch.tensor([0.95047, 1.0, 1.08883], device=x.device, dtype=x.dtype)
    xyz = torch.einsum("ij,njhw->nihw", matrix, linear) / white.view(1, 3, 1, 1)
    delta = 6 / 29
    f = torch.where(xyz > delta**3, xyz.clamp_min(1e-12) ** (1 / 3), xyz / (3 * delta**2) + 4 / 29)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


class Photometric:
    """The device half of a policy: uint8 groups [B, V, C, S, S] → float groups [V, B, C, S, S]."""

    def __init__(self, views: ViewsConfig) -> None:
        self.groups = group_specs(views)
        self.mean = views.mean
        self.std = views.std

    def normalize(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[N, C, H, W] in [0, 1] → normalised, channels-last (into `out` when given); the
        evaluation input of a Lab policy (CMC) is the normalised Lab image."""
        if out is None:
            out = torch.empty_like(x, memory_format=torch.channels_last)
        return (self._to_lab if self.groups[0].output == "lab" else self._normalize_rgb)(x, out)

    def _normalize_rgb(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not self.mean:
            return out.copy_(x)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return torch.sub(x, mean, out=out).div_(std)

    def _to_lab(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        center = torch.tensor(LAB_CENTER, device=x.device).view(1, 3, 1, 1)
        half = torch.tensor(LAB_HALF_RANGE, device=x.device).view(1, 3, 1, 1)
        return torch.sub(rgb_to_lab(x), center, out=out).div_(half)

    def __call__(self, groups: list[torch.Tensor], generator: torch.Generator | None = None) -> list[torch.Tensor]:
        out = []
        for spec, group in zip(self.groups, groups, strict=True):
            batch, count = group.shape[:2]
            rows = group.transpose(0, 1).flatten(0, 1)  # view-major uint8 [V·B, C, S, S]
            params = ph.Params.cat([ph.sample_params(view, batch, rows.device, generator) for view in spec.views])
            result = torch.empty((rows.shape[0], 3, *rows.shape[-2:]), device=rows.device,
                                 memory_format=torch.channels_last)
            for part in _chunks(rows.shape[0], rows.shape[-2] * rows.shape[-1], rows.device):
                x = rows[part].to(torch.float32, memory_format=torch.contiguous_format).div_(255)
                x = ph.augment(x, params.rows(part), spec.blur_kernel, spec.grayscale_first)
                (self._to_lab if spec.output == "lab" else self._normalize_rgb)(x, out=result[part])
            if spec.channel_split:  # e.g. L and ab: each part of the channels a group of its own
                out += [part.unflatten(0, (count, batch)) for part in result.split(list(spec.channel_split), dim=1)]
            else:
                out.append(result.unflatten(0, (count, batch)))
        return out


CPU_CHUNK_PIXELS = 2**19


def _chunks(rows: int, pixels: int, device: torch.device) -> list[slice]:
    """On a CPU the photometric chain runs on a few images at a time, so its temporaries stay in
    cache: 1.3–1.9× faster than whole batches, measured with tools/bench_views.py. A GPU takes
    the whole batch: its ops are launch-bound, not cache-bound."""
    step = rows if device.type != "cpu" else max(1, CPU_CHUNK_PIXELS // pixels)
    return [slice(start, start + step) for start in range(0, rows, step)]


def view_grid(groups: list[torch.Tensor], photometric: Photometric, count: int = 4) -> torch.Tensor:
    """A [3, H, W] image in [0, 1]: one row per image, every view of it (all groups) across,
    smaller crops padded to the largest. For TensorBoard, so users see their augmentations."""
    side = max(g.shape[-1] for g in groups)
    rows = []
    for i in range(min(count, groups[0].shape[1])):
        for group in groups:
            for view in group[:, i].float():
                if photometric.mean and view.shape[0] == len(photometric.mean):
                    mean = torch.tensor(photometric.mean, device=view.device).view(-1, 1, 1)
                    std = torch.tensor(photometric.std, device=view.device).view(-1, 1, 1)
                    view = view * std + mean
                elif view.shape[0] != 3:  # Lab planes, CPC grey patches: show the first channel
                    view = (view[:1] - view[:1].min()) / (view[:1].max() - view[:1].min() + 1e-6)
                view = view.expand(3, -1, -1) if view.shape[0] == 1 else view
                pad = side - view.shape[-1]
                rows.append(torch.nn.functional.pad(view, (0, pad, 0, pad), value=0.5))
    per_row = sum(g.shape[0] for g in groups)
    return torchvision.utils.make_grid(torch.stack(rows).clamp(0, 1).cpu(), nrow=per_row, padding=2, pad_value=1.0)
