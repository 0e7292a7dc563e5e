"""The Method protocol and the registry that maps `method.name` to a plug-in.

A method owns its networks (student, teacher, heads) and its state (queues, banks, centres).
It implements `training_step(batch, step)`, which returns a dict with
  "loss"       the scalar to minimise;
  "features"   (optional) backbone output of the first view, [B, F]: trains the online linear
               probe when one is attached (`eval.online_probe`);
  "embedding"  (optional) the projection the loss sees for the first view, [B, D]: the trainer's
               collapse metrics (std of normalised embeddings, effective rank);
  "uniform_loss" (optional, 0-dim) the loss value of a collapsed, uniform prediction (ln K for
               DINO and SwAV): the trainer warns when the loss sits there;
and any other 0-dim tensors (temperatures, teacher entropy, ...), which are averaged over the
log window and the ranks and logged under their names. The trainer calls nothing else in the
hot path, so a new method is one file plus one recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bigssl.config import Config, MethodConfig
from bigssl.errors import ConfigError
from bigssl.methods import schemas
from bigssl.methods.configs import CONFIGS

# What `training_step` receives (the data pipeline makes it; a method needs nothing of bigssl.data):
#   "views": one float tensor [V, B, C, S, S] per group of crops of one size, channels-last
#            rows: the global crops (V = data.views.views), then the local crops if any
#            (data.views.local_crops); a policy with a channel split gives one group per part
#            of the global crops' channels instead (CMC: L [V, B, 1, S, S], then ab [V, B, 2, S, S]);
#            a patch-grid policy one group of grid² patches per image (CPC: [grid², B, C, P, P]);
#   "label": [B] (−1 = none), "id": [B] sample ids, "text": [B] captions (data.views.text).
Batch = dict[str, Any]


def flat(group: torch.Tensor) -> torch.Tensor:
    """[V, B, C, H, W] → [V·B, C, H, W], view-major: the first B rows are view 0."""
    return group.flatten(0, 1)


class Method(nn.Module):
    """Base class: subclasses set `config_class`, build their networks, implement forward."""

    config_class: type[MethodConfig] = MethodConfig
    encodes_text: ClassVar[bool] = False  # has encode_text(captions): the trainer scores it zero-shot

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.online_probe: nn.Linear | None = None

    # The trunk whose features are evaluated and exported.
    backbone: nn.Module

    def training_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        out = self.training_step(batch, step)
        if self.online_probe is not None:
            out.update(self._probe_step(out, batch))
        # The loss is the one output backward goes through; the rest is read for monitoring. Detached,
        # no engine hooks them (FSDP2 registers its pre-backward hook on every grad-requiring output).
        return {name: value if name == "loss" or not torch.is_tensor(value) else value.detach()
                for name, value in out.items()}

    def attach_online_probe(self, classes: int) -> None:
        """A linear classifier on detached backbone features, trained alongside (solo-learn's
        online linear evaluation): its loss joins the method's, its gradient stops at the
        features, so pretraining is unchanged. Attach before the engine wraps the method."""
        self.online_probe = nn.Linear(int(self.backbone.num_features), classes)

    def _probe_step(self, out: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        if "features" not in out:
            raise ValueError(f"eval.online_probe: method {self.config.method.name!r} returns no 'features'")
        labels = batch["label"]
        logits = self.online_probe(out["features"].detach().float())
        labelled = labels >= 0  # unlabelled samples (-1) are left out
        loss = F.cross_entropy(logits, labels, ignore_index=-1) if labelled.any() else logits.sum() * 0
        correct = (logits.argmax(dim=1) == labels) & labelled
        accuracy = correct.sum() / labelled.sum().clamp(min=1)
        return {"loss": out["loss"] + loss, "ssl_loss": out["loss"].detach(), "probe/loss": loss.detach(),
                "probe/top1": accuracy.detach()}

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (queues, schedules); nothing by default."""

    # Schedules are functions of the optimizer step; the trainer says how long training is.
    steps_per_epoch: int = 1
    total_steps: int = 1

    def configure_schedule(self, steps_per_epoch: int, total_steps: int) -> None:
        """Called by the trainer before the optimizer is built."""
        self.steps_per_epoch, self.total_steps = max(1, steps_per_epoch), max(1, total_steps)

    def configure_data(self, num_samples: int | None) -> None:
        """Called by the trainer after building, with the number of training samples (None
        when the shards have no index): methods with per-sample state (InstDisc's memory
        bank) size it here, before the engine wraps the method or loads a checkpoint."""

    def synchronised_buffers(self) -> list[str]:
        """Buffers the method itself keeps identical on every rank (queues and banks written
        from gathered tensors): DDP need not re-broadcast them at every forward, which for a
        dataset-sized memory bank would cost more than the step."""
        return []

    def param_rules(self) -> dict[str, dict]:
        """Parameter-name prefix → options for that parameter group: `fixed_lr` (stay at the peak
        lr, no schedule), `frozen_steps` (left out of the optimizer step until this step: no
        update, no weight decay, no optimizer state), `lr_scale`. Engine-agnostic: the groups
        live in the optimizer, which every engine steps, so it holds under ZeRO and FSDP too."""
        return {}

    def weight_decay_at(self, step: int) -> float | None:
        """The weight decay of the decaying groups at `step`, or None for the optimizer's constant."""
        return None

    def unit_norm_rows(self) -> list[nn.Parameter]:
        """Parameters whose stored rows the engine rescales to unit norm before every forward
        (SwAV's prototypes, as the official code does at the start of each iteration), on
        whatever tensors its layout holds, optimizer master copies included."""
        return []

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(student, teacher) modules of identical structure; after optimizer step `step` (counted
        from 0) the engine moves every teacher parameter towards its student's by
        `ema_momentum(step)`, on whatever local tensors its layout holds. Teachers must have
        requires_grad=False."""
        return []

    def ema_momentum(self, step: int) -> float:
        """The fraction of itself the teacher keeps in the update after optimizer step `step`
        (e.g. 0.996 → 1, cosine); each method's docstring says which official index it follows."""
        return 0.0


_REGISTRY: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    def add(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        _REGISTRY[name] = cls
        schemas.register_schema(name, cls.config_class)  # recipes naming it now parse
        return cls

    return add


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        schemas.load_builtin(name)
    if name not in _REGISTRY:
        raise ConfigError(f"method.name: unknown method {name!r}; known: {', '.join(names())}")
    return _REGISTRY[name]


def method_config_class(name: str) -> type[MethodConfig]:
    return schemas.method_config_class(name)


def build(config: Config) -> Method:
    return method_class(config.method.name)(config)


def names() -> list[str]:
    """Every built-in method and every plug-in registered so far."""
    return sorted(set(CONFIGS) | set(_REGISTRY))
