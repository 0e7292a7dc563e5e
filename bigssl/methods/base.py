"""The Method protocol and the registry that maps `method.name` to a plug-in.

A method owns its networks (student, teacher, heads) and its state (queues, banks, centres).
`forward(batch, step)` returns a dict with a scalar "loss" and any scalars to log. The trainer
calls nothing else in the hot path, so a new method is one file plus one recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bigssl.config import Config, MethodConfig
from bigssl.errors import ConfigError

Batch = dict[str, Any]  # {"views": list[Tensor], "label"?: Tensor, "text"?: ...}


class Method(nn.Module):
    """Base class: subclasses set `config_class`, build their networks, implement forward."""

    config_class: type[MethodConfig] = MethodConfig

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config

    # The trunk whose features are evaluated and exported.
    backbone: nn.Module

    def forward(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (queues, schedules); nothing by default."""

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(student, teacher) modules of identical structure; after each optimizer step the
        engine moves every teacher parameter towards its student's by `ema_momentum(step)`, on
        whatever local tensors its layout holds. Teachers must have requires_grad=False."""
        return []

    def ema_momentum(self, step: int) -> float:
        """The teacher keeps this fraction of itself at `step` (e.g. 0.996 → 1, cosine)."""
        return 0.0


_REGISTRY: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    def add(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        _REGISTRY[name] = cls
        return cls

    return add


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise ConfigError(f"method.name: unknown method {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def method_config_class(name: str) -> type[MethodConfig]:
    return method_class(name).config_class


def build(config: Config) -> Method:
    return method_class(config.method.name)(config)


def names() -> list[str]:
    return sorted(_REGISTRY)
