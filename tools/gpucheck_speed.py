"""tools/gpu_check.py's speed checks: the trainer itself (bigssl.train.Trainer, its data
workers, its photometric half on the device, its engine) for a short run, read back from the
run's metrics.jsonl; the same method in a bare loop on synthetic tensors already on the device;
timm's supervised training step of the same backbone as a reference figure."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from bigssl.config import Config
from bigssl.methods import build as build_method
from bigssl.methods.context import RunContext


def trainer_run(config: Config, device: torch.device, skip_windows: int) -> dict[str, Any]:
    """Train `config` (a short run: see gpucheck_setup.run_overrides) and report the log windows
    after the first `skip_windows` (start-up, compilation): images/s, data-wait fraction, losses."""
    from bigssl.train import Trainer

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    Trainer(config).fit()
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in (Path(config.log.dir) / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "images_per_s" in r]
    kept = records[skip_windows:] or records[-1:]
    result = {"images_per_s": sum(r["images_per_s"] for r in kept) / len(kept),
              "data_wait_fraction": sum(r["data_wait_fraction"] for r in kept) / len(kept),
              "losses": [r["loss"] for r in records], "windows": len(records), "windows_kept": len(kept),
              "run_seconds": round(seconds, 1),
              # torch's own linear, as a user's DDP run has (not DeepSpeed's ZeRO-3 replacement)
              "torch_linear": torch.nn.functional.linear is torch._C._nn.linear}
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        torch.cuda.empty_cache()
    return result


def _views(config: Config, batch: int, device: torch.device) -> list[torch.Tensor]:
    from bigssl.plan.trace import view_shapes

    generator = torch.Generator(device=device).manual_seed(0)
    groups = []
    for views, channels, height, width in view_shapes(config):
        flat = torch.rand((views * batch, channels, height, width), device=device, generator=generator)
        if config.model.channels_last:  # as the photometric half hands them over
            flat = flat.contiguous(memory_format=torch.channels_last)
        groups.append(flat.view(views, batch, channels, height, width))
    return groups


def _timed(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step after `warmup` untimed steps."""
    for index in range(warmup):
        step(index)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for index in range(warmup, warmup + steps):
        step(index)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / steps


def bare_loop(config: Config, batch: int, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """The method's forward and backward, torch's AdamW, the EMA, on views already on the device:
    no data pipeline, no engine, no trainer."""
    torch.manual_seed(config.seed)
    method = build_method(config, RunContext.of(config, steps_per_epoch=100, total_steps=10_000,
                                                num_samples=100_000)).to(device)
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-5)
    inputs = {"views": _views(config, batch, device), "label": torch.zeros(batch, dtype=torch.long, device=device),
              "id": torch.arange(batch, device=device)}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.engine.precision)
    pairs = method.ema_pairs()
    teachers = [p for _, t in pairs for p in t.parameters()]
    students = [p for s, _ in pairs for p in s.parameters()]

    def step(index: int) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = method(inputs, 200 + index).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if teachers:
            with torch.no_grad():
                torch._foreach_mul_(teachers, 0.996)
                torch._foreach_add_(teachers, students, alpha=0.004)

    seconds = _timed(step, steps, warmup, device)
    return {"images_per_s": batch / seconds, "step_s": seconds}


def timm_reference(backbone: str, batch: int, device: torch.device, steps: int, warmup: int,
                   channels_last: bool) -> dict[str, Any]:
    """timm's supervised training step of `backbone` (224 px, 1000 classes, cross-entropy, SGD,
    bf16 autocast), as timm's train benchmark times it, on this device."""
    import timm

    model = timm.create_model(backbone, pretrained=False).to(device)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.rand((batch, 3, 224, 224), device=device).contiguous(memory_format=memory)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step(index: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = _timed(step, steps, warmup, device)
    return {"images_per_s": batch / seconds}


def mfu(flops_per_step: int, images_per_s: float, batch: int, peak_tflops: float | None) -> float | None:
    if not peak_tflops or not math.isfinite(images_per_s):
        return None
    return flops_per_step * images_per_s / batch / (peak_tflops * 1e12)
