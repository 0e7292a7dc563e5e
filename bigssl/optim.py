"""Optimizers and parameter groups.

Biases and normalisation parameters (every tensor with ndim ≤ 1) get no weight decay and, under
LARS, no trust-ratio adaptation: the convention of SimCLR, BYOL, Barlow Twins and MoCo v3.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bigssl.config import OptimConfig
from bigssl.errors import ConfigError
from bigssl.schedules import PerEpoch, WarmupCosine, WarmupSteps

PROBE_PREFIX = "online_probe."  # the online linear probe's parameters (methods/base.py)


@dataclass(frozen=True)
class ParamRule:
    """What a method asks of the optimizer for its parameters whose names start with `prefix`
    (`Method.param_rules`): they get groups of their own, "<prefix>:decay" and "<prefix>:no_decay"."""

    prefix: str
    fixed_lr: bool = False  # stay at the peak lr (optim.lr), no schedule: SimSiam's predictor
    # Left out of the optimizer step before this step (no update, no weight decay, no optimizer
    # state): DINO's last layer, SwAV's prototypes. The trainer marks the group `frozen`.
    frozen_steps: int = 0
    lr_scale: float | None = None  # lr relative to the schedule; None: 1 (optim.no_decay_lr_scale without decay)
    no_decay_only: bool = False  # every parameter in the no-decay group: the online probe

    def group_entries(self) -> dict[str, Any]:
        """The settings this rule changes, as the optimizer group's entries (torch keeps a group's
        options in its dict, and checkpoints them with it): only those that differ from the default."""
        entries: dict[str, Any] = {}
        if self.fixed_lr:
            entries["fixed_lr"] = True
        if self.frozen_steps:
            entries["frozen_steps"] = self.frozen_steps
        if self.lr_scale is not None:
            entries["lr_scale"] = self.lr_scale
        return entries


@dataclass(frozen=True)
class GroupSettings:
    """How the trainer sets one optimizer group before each step: its entries, read once here
    (the group dicts are torch's; param_groups wrote them)."""

    fixed_lr: bool = False
    frozen_steps: int = 0
    lr_scale: float = 1.0
    scheduled_wd: bool = False  # a method's weight-decay schedule applies to the group

    @classmethod
    def of(cls, group: dict[str, Any]) -> GroupSettings:
        return cls(fixed_lr=bool(group.get("fixed_lr", False)),
                   frozen_steps=group.get("frozen_steps", 0), lr_scale=group.get("lr_scale", 1.0),
                   scheduled_wd=bool(group.get("scheduled_wd", False)))


def param_groups(model: nn.Module, config: OptimConfig, probe_lr: float = 0.1,
                 rules: Sequence[ParamRule] = ()) -> list[dict]:
    """Named groups: "decay" and "no_decay" (biases and norms: no weight decay, no LARS
    adaptation); for each of the method's `rules` the same split under
    "<prefix>:decay"/"<prefix>:no_decay"; and "online_probe", which follows the schedule scaled
    to peak at `probe_lr`, with no weight decay and no LARS adaptation. Groups with weight decay
    carry scheduled_wd (a method's weight-decay schedule applies to them). A parameter follows
    the first rule whose prefix its name starts with."""
    probe_scale = probe_lr / config.lr if config.lr > 0 else 1.0
    by_prefix = {rule.prefix: rule for rule in (ParamRule(PROBE_PREFIX, lr_scale=probe_scale, no_decay_only=True),
                                                *rules)}
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        prefix = next((p for p in by_prefix if name.startswith(p)), "")
        rule = by_prefix.get(prefix)
        plain = (config.exclude_bias_norm and param.ndim <= 1) or (rule is not None and rule.no_decay_only)
        buckets.setdefault((prefix, not plain), []).append(param)
    groups = []
    for (prefix, decays), params in buckets.items():
        entries = by_prefix[prefix].group_entries() if prefix else {}
        label = "decay" if decays else "no_decay"
        name = "online_probe" if prefix == PROBE_PREFIX else (f"{prefix.rstrip('.')}:{label}" if prefix else label)
        groups.append({"name": name, "params": params, "weight_decay": config.weight_decay if decays else 0.0,
                       "lars_adapt": decays, "lr_scale": 1.0 if decays else config.no_decay_lr_scale,
                       "scheduled_wd": decays, **entries})
    order = {"decay": 0, "no_decay": 1}
    return sorted(groups, key=lambda g: (order.get(g["name"], 2), g["name"]))


@dataclass(frozen=True)
class Segment:
    """Where one parameter's elements lie in a flat partition: `numel` of them from `offset`.
    `index` is the parameter's place in its group, the same on every rank."""

    offset: int
    numel: int
    index: int


@dataclass(frozen=True)
class FlatLayout:
    """What LARS needs to step one flat partition of many parameters (DeepSpeed ZeRO's) as if it
    held whole tensors: the segments of this rank's partition, the number of parameters in the
    group (the length of the partial norms every rank reduces), and the sum over the ranks that
    hold the group's other partitions (from bigssl.distributed)."""

    segments: tuple[Segment, ...]
    params: int
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017), in one of two rules.

    rule "lars" (BYOL, Barlow Twins, MoCo v3: google-deepmind/deepmind-research
    byol/utils/optimizers.py, facebookresearch/barlowtwins main.py, facebookresearch/moco-v3
    moco/optimizer.py): u ← g + wd·w; if the group adapts, u ← u · η‖w‖/‖u‖ (when both norms
    are non-zero).

    rule "larc" (NVIDIA apex's LARC with clip=False, which the official SwAV wraps around SGD):
    if the group adapts and ‖w‖, ‖g‖ are both non-zero, u ← (g + wd·w) · η‖w‖/(‖g‖ + wd‖w‖ + ε),
    ε = 1e-8; otherwise u ← g (LARC adds the weight decay only inside that branch).

    Then, for both: μ ← m·μ + u (μ = u at the first step, as torch's SGD), w ← w − lr·μ.
    Groups with `lars_adapt=False` reduce to momentum SGD with weight decay.

    The norms are always those of each whole parameter tensor, as in the official code. Under DDP
    the optimizer holds whole tensors; under FSDP2 DTensor shards, whose norms DTensor reduces
    over the ranks itself. DeepSpeed ZeRO hands the optimizer one flat fp32 partition per group
    (per sub-group at stage 3) instead: the engine describes each with `set_flat_layout`, and
    the step then sums each parameter's squares over its fragments on every rank (one
    all-reduce of a vector per partition), so each fragment gets its whole tensor's trust ratio.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, rule: str = "lars") -> None:
        if rule not in ("lars", "larc"):
            raise ValueError(f"LARS rule {rule!r} is not one of lars, larc")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta,
                    "lars_adapt": True, "rule": rule}
        super().__init__(params, defaults)
        # id(flat partition) → (the partition, its layout); the tensor is kept so the id stays its own
        self._layouts: dict[int, tuple[torch.Tensor, FlatLayout]] = {}

    def set_flat_layout(self, flat: torch.Tensor, layout: FlatLayout) -> None:
        """Step `flat` (a 1-D tensor this optimizer holds) as the parameter fragments `layout` names."""
        for segment in layout.segments:
            if not (0 <= segment.offset <= segment.offset + segment.numel <= flat.numel()
                    and 0 <= segment.index < layout.params):
                raise ValueError(f"LARS.set_flat_layout: {segment} lies outside a partition of "
                                 f"{flat.numel()} elements and {layout.params} parameters")
        self._layouts[id(flat)] = (flat, layout)

    def _layout(self, param: torch.Tensor) -> FlatLayout | None:
        entry = self._layouts.get(id(param))
        if entry is not None and entry[0] is param:
            return entry[1]
        if self._layouts:  # under ZeRO every tensor here is a flat partition: a norm of one is wrong
            raise RuntimeError(f"LARS: a tensor of {param.numel()} elements with no flat layout, beside "
                               f"{len(self._layouts)} flat partitions that have one")
        return None

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                layout = self._layout(param)
                update = (_update(param, param.grad, group) if layout is None
                          else _flat_update(param, param.grad, group, layout))
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(update).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                param.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def _update(param: torch.Tensor, grad: torch.Tensor, group: dict) -> torch.Tensor:
    """The gradient with weight decay and trust ratio applied, per the group's rule."""
    decayed = _decayed(param, grad, group)
    if not group["lars_adapt"]:
        return decayed
    measured = grad if _is_larc(group) else decayed
    trust, applies = _trust_ratio(torch.linalg.vector_norm(param), torch.linalg.vector_norm(measured), group)
    return _adapted(decayed, grad, trust, applies, group)


def _flat_update(flat: torch.Tensor, grad: torch.Tensor, group: dict, layout: FlatLayout) -> torch.Tensor:
    """`_update` of every parameter fragment in a flat partition, each by its whole tensor's
    norms. Elements outside every segment (DeepSpeed's alignment padding) get the plain decayed
    gradient: no parameter reads them."""
    decayed = _decayed(flat, grad, group)
    if not group["lars_adapt"] or not layout.params:
        return decayed
    measured = grad if _is_larc(group) else decayed
    # Partial sums of squares, one row per tensor, summed over ranks: ‖w‖² and ‖g‖² (or ‖u‖²).
    squares = layout.sum_over_ranks(_partial_squares(flat, measured, layout))
    trust, applies = _trust_ratio(squares[0].sqrt(), squares[1].sqrt(), group)
    update = decayed.clone()  # decayed may be the gradient itself (no weight decay)
    for segment in layout.segments:
        piece = slice(segment.offset, segment.offset + segment.numel)
        update[piece] = _adapted(decayed[piece], grad[piece], trust[segment.index], applies[segment.index], group)
    return update


def _partial_squares(flat: torch.Tensor, measured: torch.Tensor, layout: FlatLayout) -> torch.Tensor:
    """[2, params]: this rank's Σw² and Σm² of each parameter's fragments (zero where it has none)."""
    squares = flat.new_zeros((2, layout.params))
    if not layout.segments:  # a rank holding only padding still joins the all-reduce
        return squares
    index = torch.tensor([s.index for s in layout.segments], device=flat.device)
    for row, values in enumerate((flat, measured)):
        norms = torch.stack([torch.linalg.vector_norm(values.narrow(0, s.offset, s.numel))
                             for s in layout.segments])
        squares[row].index_add_(0, index, norms.square())
    return squares


def _decayed(param: torch.Tensor, grad: torch.Tensor, group: dict) -> torch.Tensor:
    weight_decay = group["weight_decay"]
    return grad.add(param, alpha=weight_decay) if weight_decay else grad


def _is_larc(group: dict) -> bool:
    return group.get("rule", "lars") == "larc"


def _trust_ratio(param_norm: torch.Tensor, measured_norm: torch.Tensor,
                 group: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(trust ratio, whether it applies) from whole-tensor norms, one tensor or many at once:
    ‖w‖ and, for "lars", ‖g + wd·w‖, for "larc", ‖g‖."""
    weight_decay, eta = group["weight_decay"], group["eta"]
    applies = (param_norm > 0) & (measured_norm > 0)
    if _is_larc(group):
        return eta * param_norm / (measured_norm + weight_decay * param_norm + 1e-8), applies
    return eta * param_norm / measured_norm, applies


def _adapted(decayed: torch.Tensor, grad: torch.Tensor, trust: torch.Tensor, applies: torch.Tensor,
             group: dict) -> torch.Tensor:
    """The update where the trust ratio applies; elsewhere LARC falls back to the bare gradient
    and LARS to the decayed one (a ratio of 1)."""
    if _is_larc(group):
        return torch.where(applies, decayed * trust, grad)
    return decayed.mul(torch.where(applies, trust, torch.ones_like(trust)))


def build_optimizer(model: nn.Module, config: OptimConfig, probe_lr: float = 0.1,
                    rules: Sequence[ParamRule] = ()) -> torch.optim.Optimizer:
    groups = param_groups(model, config, probe_lr, rules)
    if config.name == "lars":
        optimizer: torch.optim.Optimizer = LARS(groups, lr=config.lr, momentum=config.momentum,
                                                eta=config.lars_eta, rule=config.lars_rule)
    elif config.name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    else:
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))
    return skipping_frozen_groups(optimizer)


def skipping_frozen_groups(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make `optimizer.step` leave out every group marked `frozen` (the trainer marks a group
    while its `frozen_steps` last): its parameters, moments, momentum buffers and step counts
    stay exactly as they were, which is what the official DINO and SwAV get by setting those
    gradients to None. A frozen parameter's lr set to 0 would not do it: AdamW's moments and
    step count, SGD's momentum buffer, would still build up. DeepSpeed's ZeRO optimizers step
    the same object one group at a time, so it holds there too."""
    step = optimizer.step

    def step_unfrozen(*args, **kwargs):
        groups = optimizer.param_groups
        unfrozen = [group for group in groups if not group.get("frozen")]
        if len(unfrozen) == len(groups):
            return step(*args, **kwargs)
        optimizer.param_groups = unfrozen
        try:
            return step(*args, **kwargs)
        finally:
            optimizer.param_groups = groups

    optimizer.step = step_unfrozen  # type: ignore[method-assign]
    return optimizer


def lr_schedule(config: OptimConfig, steps_per_epoch: int,
                total_steps: int) -> WarmupCosine | WarmupSteps | PerEpoch:
    """The lr as a function of the step: warm-up, then a cosine to `min_lr` or step decays;
    with `lr_per_epoch`, held at each epoch's first value."""
    schedule = _lr_curve(config, steps_per_epoch, total_steps)
    return PerEpoch(schedule, max(1, steps_per_epoch)) if config.lr_per_epoch else schedule


def _lr_curve(config: OptimConfig, steps_per_epoch: int, total_steps: int) -> WarmupCosine | WarmupSteps:
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if config.lr_schedule == "cosine":
        return WarmupCosine(peak=config.lr, total_steps=total_steps, warmup_steps=warmup, final=config.min_lr,
                            start=config.warmup_start_lr, warmup_includes_peak=config.warmup_includes_peak)
    if config.lr_schedule != "step":
        raise ConfigError(f"optim.lr_schedule: {config.lr_schedule!r} is not one of cosine, step")
    milestones = list(config.lr_milestones)
    if not milestones or milestones != sorted(milestones):
        raise ConfigError(f"optim.lr_milestones: {milestones} must be increasing epochs for lr_schedule: step")
    factors = list(config.lr_factors) or [0.1 ** (i + 1) for i in range(len(milestones))]
    if len(factors) != len(milestones):
        raise ConfigError(f"optim.lr_factors: {len(factors)} factors for {len(milestones)} optim.lr_milestones")
    return WarmupSteps(peak=config.lr, milestones=tuple(round(m * steps_per_epoch) for m in milestones),
                       factors=tuple(factors), warmup_steps=warmup, start=config.warmup_start_lr,
                       warmup_includes_peak=config.warmup_includes_peak)
