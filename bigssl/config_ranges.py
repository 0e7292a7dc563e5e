"""The allowed range of every numeric config key, as one table, and the check that applies it.

A value out of range fails before anything is built, naming its key (`optim.max_steps: must be
>= 0, got -1`), instead of training zero steps or failing deep inside torch without a key. Every
float anywhere in the config, free-form dicts and lists included, must also be finite: OmegaConf
reads `nan` and `inf` as floats.

To add a key: one line in RANGES (or METHOD_RANGES for a method field). tests/test_config.py
fails for a numeric field of a built-in schema that has no line here, so a new field cannot be
left unchecked by accident. A list-valued key's range applies to each of its elements.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from bigssl.errors import ConfigError

INT64_MAX = 2**63 - 1  # torch and numpy take seeds, sizes and counts as 64-bit integers


@dataclass(frozen=True)
class Bound:
    """An interval; None leaves a side unbounded; `open_*` excludes that end."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.open_high and value == self.high))

    def __str__(self) -> str:
        if self.low is None and self.high is None:
            return "finite"
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.open_high else '<='} {self.high:g}"
        return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"


ANY = Bound()
NON_NEGATIVE = Bound(0)
POSITIVE = Bound(0, open_low=True)
AT_LEAST_ONE = Bound(1)
PROBABILITY = Bound(0, 1)
EMA = Bound(0, 1)  # momentum of an exponential moving average: 1 freezes, 0 copies
AREA_FRACTION = Bound(0, 1, open_low=True)
BELOW_ONE = Bound(0, 1, open_high=True)  # SGD momentum, Adam's betas: 1 never forgets

RANGES: dict[str, Bound] = {
    "seed": Bound(0, INT64_MAX),
    "data.samples_per_epoch": NON_NEGATIVE,  # 0 = from the index
    "data.weights": NON_NEGATIVE,
    "data.workers": NON_NEGATIVE,
    "data.interleave": AT_LEAST_ONE,
    "data.shuffle_buffer": NON_NEGATIVE,
    "data.micro_batch": NON_NEGATIVE,
    "data.timeout_s": NON_NEGATIVE,  # 0 = wait forever
    "data.views.size": AT_LEAST_ONE,
    "data.views.views": AT_LEAST_ONE,
    "data.views.crop_scale": AREA_FRACTION,
    "data.views.crop_ratio": POSITIVE,
    "data.views.local_crops": NON_NEGATIVE,
    "data.views.local_size": AT_LEAST_ONE,
    "data.views.local_crop_scale": AREA_FRACTION,
    "data.views.flip_prob": PROBABILITY,
    "data.views.jitter": NON_NEGATIVE,  # (the hue's own limit is checked in config.validate)
    "data.views.jitter_prob": PROBABILITY,
    "data.views.grayscale_prob": PROBABILITY,
    "data.views.blur_prob": PROBABILITY,
    "data.views.local_blur_prob": PROBABILITY,
    "data.views.blur_sigma": POSITIVE,
    "data.views.solarize_prob": PROBABILITY,
    "data.views.local_solarize_prob": PROBABILITY,
    "data.views.mean": ANY,
    "data.views.std": POSITIVE,
    "data.views.resize": AT_LEAST_ONE,
    "data.views.grid": AT_LEAST_ONE,
    "data.views.patch": AT_LEAST_ONE,
    "data.views.patch_jitter": NON_NEGATIVE,
    "data.views.channel_split": AT_LEAST_ONE,
    "model.small_stem_stride": AT_LEAST_ONE,
    "model.pool_grid": AT_LEAST_ONE,
    "model.projector.hidden_dim": AT_LEAST_ONE,
    "model.projector.out_dim": AT_LEAST_ONE,
    "model.projector.layers": AT_LEAST_ONE,
    "optim.batch_size": AT_LEAST_ONE,
    "optim.epochs": AT_LEAST_ONE,
    "optim.max_steps": NON_NEGATIVE,  # 0 = no cap
    "optim.base_lr": POSITIVE,
    "optim.lr": NON_NEGATIVE,  # 0 = derived from base_lr
    "optim.min_lr": NON_NEGATIVE,
    "optim.min_lr_fraction": NON_NEGATIVE,
    "optim.lr_milestones": NON_NEGATIVE,
    "optim.lr_factors": NON_NEGATIVE,
    "optim.warmup_epochs": NON_NEGATIVE,
    "optim.warmup_start_lr": NON_NEGATIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.no_decay_lr_scale": NON_NEGATIVE,
    "optim.momentum": BELOW_ONE,
    "optim.betas": BELOW_ONE,
    "optim.lars_eta": POSITIVE,
    "optim.clip_grad": NON_NEGATIVE,  # 0 = off
    "optim.nonfinite_limit": AT_LEAST_ONE,
    "engine.zero_stage": Bound(1, 3),
    "engine.timeout_s": POSITIVE,
    "engine.dead_rank_timeout_s": NON_NEGATIVE,  # 0 = off
    "engine.loss_scale_init": AT_LEAST_ONE,  # (and a power of two: config.validate)
    "log.every_steps": AT_LEAST_ONE,
    "checkpoint.every_steps": NON_NEGATIVE,  # 0 = at epoch ends only
    "checkpoint.keep": AT_LEAST_ONE,
    "eval.knn_every_epochs": NON_NEGATIVE,
    "eval.knn_k": AT_LEAST_ONE,
    "eval.knn_temperature": POSITIVE,
    "eval.batch_size": AT_LEAST_ONE,
    "eval.online_probe_classes": NON_NEGATIVE,
    "eval.projector_samples": NON_NEGATIVE,
    "eval.online_probe_lr": POSITIVE,
}

# `method.<field>` of the built-in method that runs: a field name means the same in every one
# that has it (a temperature is positive wherever it appears), so one line covers them all. A
# plug-in method's fields are only checked for being finite: its names may mean other things.
METHOD_RANGES: dict[str, Bound] = {
    "temperature": POSITIVE,
    "momentum": EMA,
    "lambd": NON_NEGATIVE,
    "predictor_hidden_dim": AT_LEAST_ONE,
    "embed_dim": AT_LEAST_ONE,
    "context_length": AT_LEAST_ONE,
    "text_width": AT_LEAST_ONE,
    "text_layers": AT_LEAST_ONE,
    "text_heads": AT_LEAST_ONE,
    "init_temperature": POSITIVE,
    "max_logit_scale": POSITIVE,
    "negatives": NON_NEGATIVE,  # instdisc softmax: 0 = the whole bank
    "freeze_prototypes_steps": NON_NEGATIVE,  # swav: 0 = use freeze_prototypes_epochs
    "bank_momentum": EMA,
    "context_dim": AT_LEAST_ONE,
    "context_layers": NON_NEGATIVE,
    "steps": AT_LEAST_ONE,
    "out_dim": AT_LEAST_ONE,
    "hidden_dim": AT_LEAST_ONE,
    "bottleneck_dim": AT_LEAST_ONE,
    "freeze_last_layer_epochs": NON_NEGATIVE,
    "student_temp": POSITIVE,
    "teacher_temp": POSITIVE,
    "teacher_temp_final": POSITIVE,
    "teacher_temp_warmup_epochs": NON_NEGATIVE,
    "center_momentum": EMA,
    "weight_decay_end": NON_NEGATIVE,
    "queue_size": AT_LEAST_ONE,
    "key_bn_splits": AT_LEAST_ONE,
    "prototypes": AT_LEAST_ONE,
    "epsilon": POSITIVE,
    "sinkhorn_iterations": AT_LEAST_ONE,
    "freeze_prototypes_epochs": NON_NEGATIVE,
    "queue_length": NON_NEGATIVE,  # 0 = no queue
    "queue_start_epoch": NON_NEGATIVE,
}


def bound_of(key: str, method_ranges: bool = True, own_ranges: Mapping[str, Bound] | None = None) -> Bound | None:
    if key.startswith("method."):
        name = key.removeprefix("method.")
        if own_ranges and name in own_ranges:
            return own_ranges[name]
        return METHOD_RANGES.get(name) if method_ranges else None
    return RANGES.get(key)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _numbers(value: Any, key: str) -> Iterator[tuple[str, int | float, Any]]:
    """(key, number, the whole value) for each number in `value`: dataclass fields by dotted key,
    list elements and free-form dict entries under the key that holds them."""
    if is_dataclass(value):
        for item in fields(value):
            yield from _numbers(getattr(value, item.name), f"{key}.{item.name}" if key else item.name)
    elif isinstance(value, dict):
        for name, item in value.items():
            yield from _numbers(item, f"{key}.{name}")
    elif isinstance(value, (list, tuple)):
        for item in value:
            for _, number, _ in _numbers(item, key):
                yield key, number, value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield key, value, value


def check_values(config: Any, prefix: str = "", method_ranges: bool = True,
                 own_ranges: Mapping[str, Bound] | None = None) -> None:
    """Raise ConfigError for the first number that is not finite, does not fit in 64 bits, or is
    outside its key's range; None (a view setting the policy fills) is left alone.
    `method_ranges`: apply METHOD_RANGES (a built-in method runs); `own_ranges`: the method
    config's own `ranges`, which come first."""
    for key, number, whole in _numbers(config, prefix):
        if isinstance(number, float) and not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {_shown(whole)}")
        if isinstance(number, int) and abs(number) > INT64_MAX:
            raise ConfigError(f"{key}: {_shown(number)} does not fit in 64 bits")
        bound = bound_of(key, method_ranges, own_ranges)
        if bound is not None and not bound.holds(number):
            rule = f"every value must be {bound}" if whole is not number else f"must be {bound}"
            raise ConfigError(f"{key}: {rule}, got {_shown(whole)}")
