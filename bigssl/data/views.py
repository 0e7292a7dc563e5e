"""View policies: how one decoded image (uint8 tensor [3, H, W]) becomes the augmented views a
method consumes.

A policy is named in the recipe (`data.views.policy`) and reads its parameters from
`data.views`; the defaults are the papers' values (reference/methods.md §1.3).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision.transforms.v2 as T

from bigssl.config import ViewsConfig
from bigssl.errors import ConfigError

ViewPolicy = Callable[[torch.Tensor], list[torch.Tensor]]


def blur_kernel(size: int) -> int:
    """SimCLR blurs with a kernel of 10% of the image side; odd, at least 3."""
    kernel = max(3, int(0.1 * size))
    return kernel if kernel % 2 else kernel + 1


def _to_tensor(config: ViewsConfig) -> list[T.Transform]:
    steps: list[T.Transform] = [T.ToImage(), T.ToDtype(torch.float32, scale=True)]
    if config.mean:
        steps.append(T.Normalize(config.mean, config.std))
    return steps


def simclr_transform(config: ViewsConfig) -> T.Compose:
    """SimCLR App. A: random resized crop, flip, colour distortion (jitter 0.8, grey 0.2), blur."""
    s = config.jitter_strength
    return T.Compose([
        T.RandomResizedCrop(config.size, scale=tuple(config.crop_scale), ratio=tuple(config.crop_ratio),
                            antialias=True),
        T.RandomHorizontalFlip(config.flip_prob),
        T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=config.jitter_prob),
        T.RandomGrayscale(config.grayscale_prob),
        T.RandomApply([T.GaussianBlur(blur_kernel(config.size), sigma=tuple(config.blur_sigma))],
                      p=config.blur_prob),
        *_to_tensor(config),
    ])


def two_views(transform: Callable[[torch.Tensor], torch.Tensor]) -> ViewPolicy:
    def policy(image: torch.Tensor) -> list[torch.Tensor]:
        return [transform(image), transform(image)]

    return policy


_POLICIES: dict[str, Callable[[ViewsConfig], ViewPolicy]] = {
    "simclr": lambda config: two_views(simclr_transform(config)),
}


def build_policy(config: ViewsConfig) -> ViewPolicy:
    if config.policy not in _POLICIES:
        raise ConfigError(
            f"data.views.policy: unknown policy {config.policy!r}; known: {', '.join(sorted(_POLICIES))}")
    return _POLICIES[config.policy](config)


def eval_transform(config: ViewsConfig) -> T.Compose:
    """Deterministic view for feature extraction: resize the short side, centre crop."""
    return T.Compose([T.Resize(config.size, antialias=True), T.CenterCrop(config.size), *_to_tensor(config)])
