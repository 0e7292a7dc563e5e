"""Optimizers and parameter groups.

Biases and normalisation parameters (every tensor with ndim ≤ 1) get no weight decay and, under
LARS, no trust-ratio adaptation: the convention of SimCLR, BYOL, Barlow Twins and MoCo v3.
"""

from __future__ import annotations

import torch
from torch import nn

from bigssl.config import OptimConfig
from bigssl.errors import ConfigError
from bigssl.schedules import PerEpoch, WarmupCosine, WarmupSteps

PROBE_PREFIX = "online_probe."  # the online linear probe's parameters (Method.attach_online_probe)


def param_groups(model: nn.Module, config: OptimConfig, probe_lr: float = 0.1,
                 rules: dict[str, dict] | None = None) -> list[dict]:
    """Named groups: "decay" and "no_decay" (biases and norms: no weight decay, no LARS
    adaptation); for each of the method's `rules` (parameter-name prefix → group options such as
    fixed_lr, frozen_steps, lr_scale) the same split under "<prefix>:decay"/"<prefix>:no_decay";
    and "online_probe", which follows the schedule scaled to peak at `probe_lr`, with no weight
    decay and no LARS adaptation. Groups with weight decay carry scheduled_wd (a method's
    weight-decay schedule applies to them)."""
    probe_scale = probe_lr / config.lr if config.lr > 0 else 1.0
    rules = {PROBE_PREFIX: {"lr_scale": probe_scale, "no_decay_only": True}, **(rules or {})}
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        prefix = next((p for p in rules if name.startswith(p)), "")
        plain = (config.exclude_bias_norm and param.ndim <= 1) or rules.get(prefix, {}).get("no_decay_only", False)
        buckets.setdefault((prefix, not plain), []).append(param)
    groups = []
    for (prefix, decays), params in buckets.items():
        options = {k: v for k, v in rules.get(prefix, {}).items() if k != "no_decay_only"}
        label = "decay" if decays else "no_decay"
        name = "online_probe" if prefix == PROBE_PREFIX else (f"{prefix.rstrip('.')}:{label}" if prefix else label)
        groups.append({"name": name, "params": params, "weight_decay": config.weight_decay if decays else 0.0,
                       "lars_adapt": decays, "lr_scale": 1.0 if decays else config.no_decay_lr_scale,
                       "scheduled_wd": decays, **options})
    order = {"decay": 0, "no_decay": 1}
    return sorted(groups, key=lambda g: (order.get(g["name"], 2), g["name"]))


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017).

    Per tensor: g ← g + wd·w; if the group adapts, g ← g · η‖w‖/‖g‖ (when both norms are
    non-zero); μ ← m·μ + g; w ← w − lr·μ. This is the variant of BYOL, Barlow Twins and MoCo v3
    (google-deepmind/deepmind-research byol/utils/optimizers.py, facebookresearch/barlowtwins
    main.py, facebookresearch/moco-v3 moco/optimizer.py); groups with `lars_adapt=False` reduce
    to momentum SGD.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta,
                    "lars_adapt": True}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if group["weight_decay"]:
                    grad = grad.add(param, alpha=group["weight_decay"])
                if group["lars_adapt"]:
                    param_norm, grad_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(grad)
                    trust = torch.where((param_norm > 0) & (grad_norm > 0),
                                        group["eta"] * param_norm / grad_norm, torch.ones_like(param_norm))
                    grad = grad.mul(trust)
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(grad).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                param.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, config: OptimConfig, probe_lr: float = 0.1,
                    rules: dict[str, dict] | None = None) -> torch.optim.Optimizer:
    groups = param_groups(model, config, probe_lr, rules)
    if config.name == "lars":
        return LARS(groups, lr=config.lr, momentum=config.momentum, eta=config.lars_eta)
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))


def lr_schedule(config: OptimConfig, steps_per_epoch: int,
                total_steps: int) -> WarmupCosine | WarmupSteps | PerEpoch:
    """The lr as a function of the step: warm-up, then a cosine to `min_lr` or step decays;
    with `lr_per_epoch`, held at each epoch's first value."""
    schedule = _lr_curve(config, steps_per_epoch, total_steps)
    return PerEpoch(schedule, max(1, steps_per_epoch)) if config.lr_per_epoch else schedule


def _lr_curve(config: OptimConfig, steps_per_epoch: int, total_steps: int) -> WarmupCosine | WarmupSteps:
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if config.lr_schedule == "cosine":
        return WarmupCosine(peak=config.lr, total_steps=total_steps, warmup_steps=warmup, final=config.min_lr)
    if config.lr_schedule != "step":
        raise ConfigError(f"optim.lr_schedule: {config.lr_schedule!r} is not one of cosine, step")
    milestones = list(config.lr_milestones)
    if not milestones or milestones != sorted(milestones):
        raise ConfigError(f"optim.lr_milestones: {milestones} must be increasing epochs for lr_schedule: step")
    factors = list(config.lr_factors) or [0.1 ** (i + 1) for i in range(len(milestones))]
    if len(factors) != len(milestones):
        raise ConfigError(f"optim.lr_factors: {len(factors)} factors for {len(milestones)} optim.lr_milestones")
    return WarmupSteps(peak=config.lr, milestones=tuple(round(m * steps_per_epoch) for m in milestones),
                       factors=tuple(factors), warmup_steps=warmup)
