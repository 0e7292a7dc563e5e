"""The Method contract and the registry that maps `method.name` to a plug-in.

A method is built in one constructor call, `Method(config, model, views, run)`, from
  config   its own section (`method.*`, its `config_class`), kept as `self.config`;
  model    the model section (`model.*`: backbone, its arguments, the projector), `self.model_config`;
  views    the `ViewLayout` of the views it will receive (what the view policy declares), `self.view_layout`;
  run      the `RunContext` (methods/context.py), `self.run`: global batch, world size, seed,
           steps per epoch, total steps, training samples, online-probe classes, the
           optimizer's weight decay.
It never sees the whole `Config`, reads no other section and imports nothing of bigssl.data.
A subclass sets `config_class` and implements `build` (its networks and state: `backbone`, the
trunk that is evaluated and exported; heads, teachers, queues, banks; checks of its settings)
and `training_step(batch, step)`, which returns a `StepOutput`: the loss, optionally the
backbone features and the embedding of the first view, the loss of a uniform prediction and
0-dim metrics. After `build` the base class adds the online linear probe when the context asks
for one. Nothing is configured later, so a new method is one file plus one recipe:
bigssl/methods/<name>.py with its config dataclass and `@register("<name>")` is found by name
(bigssl/methods/schemas.py).

Optional hooks: `param_rules` (typed `bigssl.optim.ParamRule`s for prefixes of parameter
names), `weight_decay_at`, `unit_norm_rows`, `after_step`, `synchronised_buffers`, and a
teacher: set `self.teacher` to a `bigssl.methods.teacher.EMATeacher` and its pairs and momentum
are what the engine updates (`ema_pairs`, `ema_momentum`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from bigssl.config import Config, MethodConfig, ModelConfig
from bigssl.distributed import comm
from bigssl.errors import ConfigError
from bigssl.methods import schemas
from bigssl.methods.context import RunContext, ViewLayout
from bigssl.methods.teacher import EMATeacher
from bigssl.optim import ParamRule

# What `training_step` receives (the data pipeline makes it; a method needs nothing of bigssl.data):
#   "views": one float tensor [V, B, C, S, S] per group of crops of one size, channels-last
#            rows: the global crops (V = ViewLayout.views), then the local crops if any
#            (ViewLayout.local_crops); a layout with a channel split gives one group per part
#            of the global crops' channels instead (CMC: L [V, B, 1, S, S], then ab [V, B, 2, S, S]);
#            a patch-grid layout one group of grid² patches per image (CPC: [grid², B, C, P, P]);
#   "label": [B] (−1 = none), "id": [B] sample ids, "text": [B] captions (ViewLayout.text).
Batch = dict[str, Any]


class StepOutput(NamedTuple):
    """What a training step gives the trainer. A NamedTuple, not a dataclass: the engines'
    wrappers (DDP, FSDP2's and ZeRO-3's backward hooks) look inside tuples and dicts for the
    tensors a backward starts from, and pass other objects through unseen."""

    loss: torch.Tensor  # the scalar to minimise (with the online probe: the method's loss plus the probe's)
    # Backbone output of the first view, [B, F]: trains the online linear probe.
    features: torch.Tensor | None = None
    # The projection the loss sees for the first view, [B, D]: the trainer's collapse metrics
    # (std of normalised embeddings, effective rank).
    embedding: torch.Tensor | None = None
    # 0-dim: the loss of a collapsed, uniform prediction (ln K for DINO and SwAV); logged, and the
    # trainer warns when the loss sits there.
    uniform_loss: torch.Tensor | None = None
    # Other 0-dim tensors (temperatures, teacher entropy, ...): averaged over the log window and
    # the ranks and logged under their names. Never mutated: a step returns a dict of its own.
    metrics: Mapping[str, torch.Tensor] = {}
    ssl_loss: torch.Tensor | None = None  # set with the online probe: the method's own loss, which is logged

    def scalars(self) -> dict[str, torch.Tensor]:
        """Every 0-dim number logged under its own name: the metrics and the uniform loss."""
        scalars = dict(self.metrics)
        if self.uniform_loss is not None:
            scalars["uniform_loss"] = self.uniform_loss
        return scalars


def flat(group: torch.Tensor) -> torch.Tensor:
    """[V, B, C, H, W] → [V·B, C, H, W], view-major: the first B rows are view 0."""
    return group.flatten(0, 1)


def _detached(value: torch.Tensor | None) -> torch.Tensor | None:
    return None if value is None else value.detach()


class Method(nn.Module):
    """Base class: subclasses set `config_class` (and annotate `config` with it), implement
    `build` and `training_step`."""

    config_class: type[MethodConfig] = MethodConfig
    encodes_text: ClassVar[bool] = False  # has encode_text(captions): the trainer scores it zero-shot

    # The trunk whose features are evaluated and exported.
    backbone: nn.Module
    # The EMA teacher, if the method has one (methods/teacher.py).
    teacher: EMATeacher | None = None

    def __init__(self, config: MethodConfig, model: ModelConfig, views: ViewLayout, run: RunContext) -> None:
        super().__init__()
        self.config = config
        self.model_config = model
        self.view_layout = views
        self.run = run
        self.online_probe: nn.Linear | None = None
        self.build()
        if run.probe_classes:
            # A linear classifier on detached backbone features, trained alongside (solo-learn's
            # online linear evaluation): its loss joins the method's, its gradient stops at the
            # features, so pretraining is unchanged. Made after the method's own modules, so
            # those draw the same initial weights with or without it.
            self.online_probe = nn.Linear(int(self.backbone.num_features), run.probe_classes)

    def build(self) -> None:  # pragma: no cover
        """Build the networks and state from self.config, self.model_config, self.view_layout
        and self.run (called once, by the constructor)."""
        raise NotImplementedError

    def training_step(self, batch: Batch, step: int) -> StepOutput:  # pragma: no cover
        raise NotImplementedError

    def forward(self, batch: Batch, step: int) -> StepOutput:
        out = self.training_step(batch, step)
        loss, metrics, ssl_loss = out.loss, dict(out.metrics), None
        if self.online_probe is not None:
            probe_loss, probe_metrics = self._probe_step(out, batch)
            loss, ssl_loss = out.loss + probe_loss, out.loss.detach()
            metrics.update(probe_metrics)
        for name, value in metrics.items():
            if not (torch.is_tensor(value) and value.ndim == 0):
                raise ValueError(f"method {self.config.name!r}: metric {name!r} is not a 0-dim tensor")
        # The loss is the one output backward goes through; the rest is read for monitoring. Detached,
        # no engine hooks them (FSDP2 registers its pre-backward hook on every grad-requiring output).
        return StepOutput(loss=loss, features=_detached(out.features), embedding=_detached(out.embedding),
                          uniform_loss=_detached(out.uniform_loss),
                          metrics={name: value.detach() for name, value in metrics.items()}, ssl_loss=ssl_loss)

    def _probe_step(self, out: StepOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if out.features is None:
            raise ValueError(f"eval.online_probe: method {self.config.name!r} returns no 'features'")
        labels = batch["label"]
        logits = self.online_probe(out.features.detach().float())
        labelled = labels >= 0  # unlabelled samples (-1) are left out
        loss = F.cross_entropy(logits, labels, ignore_index=-1) if labelled.any() else logits.sum() * 0
        correct = (logits.argmax(dim=1) == labels) & labelled
        accuracy = correct.sum() / labelled.sum().clamp(min=1)
        return loss, {"probe/loss": loss.detach(), "probe/top1": accuracy.detach()}

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (queues, schedules); nothing by default."""

    def synchronised_buffers(self) -> list[str]:
        """Buffers the method itself keeps identical on every rank (queues and banks written
        from gathered tensors): DDP need not re-broadcast them at every forward, which for a
        dataset-sized memory bank would cost more than the step."""
        return []

    def param_rules(self) -> list[ParamRule]:
        """Per-prefix options for parameter groups of their own (`ParamRule`: fixed_lr,
        frozen_steps, lr_scale). Engine-agnostic: the groups live in the optimizer, which every
        engine steps, so they hold under ZeRO and FSDP too."""
        return []

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
        `ema_momentum(step)`, on whatever local tensors its layout holds. Teachers have
        requires_grad=False. By default the pairs of `self.teacher`."""
        return list(self.teacher.pairs) if self.teacher is not None else []

    def ema_momentum(self, step: int) -> float:
        """The fraction of itself the teacher keeps in the update after optimizer step `step`
        (e.g. 0.996 → 1, cosine); each method's docstring says which official index it follows."""
        return self.teacher.momentum(step) if self.teacher is not None else 0.0


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


def build(config: Config, context: RunContext | None = None) -> Method:
    """The method `config` names, from its sections; `context` by default: one epoch of one step
    on the current world size, the dataset size unknown."""
    context = context or RunContext.of(config, world_size=comm.world_size())
    cls = method_class(config.method.name)
    return cls(config.method, config.model, ViewLayout.of(config.data.views), context)


def names() -> list[str]:
    """Every built-in method (one-file ones included, found without importing them) and every
    plug-in registered so far."""
    return sorted(set(schemas.builtin_names()) | set(_REGISTRY))
