"""tools/gpu_check.py's step checks: one batch from the real data pipeline, then a few training
steps of the same method from the same initial weights under every engine (DDP, ZeRO-1/2/3,
FSDP2) and precision, through bigssl's engines as the trainer drives them."""

from __future__ import annotations

import time
from typing import Any

import torch

from bigssl.config import Config
from bigssl.data.pipeline import TrainData
from bigssl.data.position import Consumed
from bigssl.distributed.engines import build_engine
from bigssl.distributed.env import DistEnv
from bigssl.methods import build as build_method
from bigssl.methods.context import RunContext
from bigssl.optim import GroupSettings, build_optimizer, lr_schedule

ENGINES = {"ddp": ["engine.kind=ddp"], "zero1": ["engine.kind=deepspeed", "engine.zero_stage=1"],
           "zero2": ["engine.kind=deepspeed", "engine.zero_stage=2"],
           "zero3": ["engine.kind=deepspeed", "engine.zero_stage=3"], "fsdp": ["engine.kind=fsdp"]}
BF16_TOLERANCE = 1e-2  # relative: bf16 keeps 8 significant bits (2⁻⁸ ≈ 0.4 %); reductions in other orders


def real_batch(config: Config, device: torch.device, local_batch: int) -> dict[str, Any]:
    """The first batch of the run's own stream (workers decode and crop), its photometric half
    on `device`, as TrainData.to_device does."""
    data = TrainData(config, 0, 1, local_batch)
    loader = data.loader(0, 0, Consumed(), Consumed())
    batch = next(iter(loader))
    generator = torch.Generator(device=device).manual_seed(config.seed)
    views = data.photometric([g.to(device, non_blocking=True) for g in batch["views"]], generator)
    return {**batch, "views": views, "label": batch["label"].to(device)}


def train_steps(config: Config, batch: dict[str, Any], device: torch.device, steps: int) -> dict[str, Any]:
    """`steps` steps of config's method on `batch` under config's engine, from the seed's initial
    weights, the trainer's order (lr, forward, backward, step, EMA, after_step).

    torch.nn.functional.linear is put back afterwards: DeepSpeed's ZeRO-3 replaces it for the
    rest of the process with its own autograd.Function (memory_efficient_linear), and every later
    check (FSDP2's step, the Trainer's and the bare loop's throughput, the compiled run) would run
    that instead of torch's linear, as no DDP or FSDP2 run of a user's does."""
    linear = torch.nn.functional.linear
    try:
        return _train_steps(config, batch, device, steps)
    finally:
        torch.nn.functional.linear = linear


def _train_steps(config: Config, batch: dict[str, Any], device: torch.device, steps: int) -> dict[str, Any]:
    steps_per_epoch = 100
    torch.manual_seed(config.seed)
    method = build_method(config, RunContext.of(config, steps_per_epoch=steps_per_epoch,
                                                total_steps=config.optim.epochs * steps_per_epoch, num_samples=100_000))
    engine = build_engine(config, DistEnv(), device)
    engine.setup(method, lambda module: build_optimizer(module, config.optim, config.eval.online_probe_lr,
                                                        method.param_rules()))
    lr = lr_schedule(config.optim, steps_per_epoch, config.optim.epochs * steps_per_epoch)
    losses, started = [], time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Past the warm-up's zero lr, so that the second loss shows the first update.
    first = steps_per_epoch * 2
    for step in range(first, first + steps):
        for group in engine.optimizer.param_groups:
            settings = GroupSettings.of(group)
            group["lr"] = (config.optim.lr if settings.fixed_lr else lr(step)) * settings.lr_scale
        torch.manual_seed(config.seed + step)  # drop-path draws: the same under every engine
        out = engine.forward(batch, step)
        losses.append(float(out.loss.detach()))
        engine.backward(out.loss)
        engine.step()
        if pairs := method.ema_pairs():
            engine.ema_update(pairs, method.ema_momentum(step))
        method.after_step(step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    # "DistributedDataParallel" under DDP: the one-rank group makes it wrap, so its reducer runs.
    wrapper = type(getattr(engine, "module", None) or getattr(engine, "ds", None) or method).__name__
    result = {"losses": losses, "seconds": round(time.perf_counter() - started, 3), "runs_as": wrapper,
              **engine.metrics()}
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return result


def compare(losses: list[float], reference: list[float], tolerance: float) -> tuple[bool, float]:
    """Every loss finite and within `tolerance` (relative) of the reference's at the same step."""
    worst = max(abs(a - b) / max(1e-6, abs(b)) for a, b in zip(losses, reference, strict=True))
    finite = all(torch.isfinite(torch.tensor(losses)))
    return bool(finite and worst <= tolerance), worst


def photometric_on_device(config: Config, device: torch.device, batch: int, tolerance: float) -> dict[str, Any]:
    """The photometric chain of every view group (jitter, grayscale, blur, solarize) on `device`
    and on the CPU, from the same decoded crops and the same random draws: the same pixels to
    `tolerance`, as tests/test_photometric.py holds the batched ops to the per-image reference."""
    from dataclasses import fields

    from bigssl.data import photometric as ph
    from bigssl.data.views import group_specs

    data = TrainData(config, 0, 1, batch)
    uint8 = next(iter(data.loader(0, 0, Consumed(), Consumed())))["views"]
    generator = torch.Generator().manual_seed(0)
    worst, seconds = 0.0, {"cpu": 0.0, "device": 0.0}
    worst_no_tf32 = 0.0
    for spec, group in zip(group_specs(config.data.views), uint8, strict=True):
        rows = group.transpose(0, 1).flatten(0, 1).float().div_(255)  # view-major, as Photometric
        params = ph.Params.cat([ph.sample_params(view, group.shape[0], torch.device("cpu"), generator)
                                for view in spec.views])
        on_device = ph.Params(**{f.name: getattr(params, f.name).to(device) for f in fields(ph.Params)})
        started = time.perf_counter()
        expected = ph.augment(rows.clone(), params, spec.blur_kernel, spec.grayscale_first)
        seconds["cpu"] += time.perf_counter() - started
        moved = rows.to(device)
        _sync(device)
        started = time.perf_counter()
        got = ph.augment(moved.clone(), on_device, spec.blur_kernel, spec.grayscale_first)
        _sync(device)
        seconds["device"] += time.perf_counter() - started
        worst = max(worst, float((got.cpu() - expected).abs().max()))
        if device.type == "cuda":  # where the difference comes from, if any: cuDNN's TF32 convolutions
            previous = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = False
            try:
                exact = ph.augment(moved.clone(), on_device, spec.blur_kernel, spec.grayscale_first)
            finally:
                torch.backends.cudnn.allow_tf32 = previous
            worst_no_tf32 = max(worst_no_tf32, float((exact.cpu() - expected).abs().max()))
    images = batch * sum(g.shape[1] for g in uint8)
    return {"passed": worst <= tolerance, "max_abs_difference": worst, "tolerance": tolerance,
            "max_abs_difference_cudnn_tf32_off": worst_no_tf32 if device.type == "cuda" else None,
            "crops": images, "cpu_crops_per_s": images / seconds["cpu"],
            "device_crops_per_s": images / seconds["device"]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
