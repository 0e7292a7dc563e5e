"""The order, sizes and budgets of tools/gpu_check.py's checks (GPU seconds; --cpu uses its own)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gpucheck_setup as setup
import gpucheck_speed as speed
import gpucheck_steps as steps
import torch

from bigssl.distributed import env as env_lib
from bigssl.plan.devices import bf16_peak_tflops

NO_GPU = "skipped: no GPU"
DINO_DATA_WAIT, OVERHEAD, DINO_MFU = 0.10, 0.05, 0.23  # issue 21's targets
PHOTOMETRIC_TOLERANCE = 1e-4  # float32 pixels in [0, 1]: a few ulp of GPU-vs-CPU rounding, not a TF32 blur


def run_checks(report, tmp: Path, cpu: bool) -> dict[str, Any]:
    device = torch.device("cpu") if cpu else torch.device("cuda", 0)
    name = "CPU" if cpu else torch.cuda.get_device_name(device)
    peak = None if cpu else bf16_peak_tflops(name)
    info = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "peak_tflops": peak,
            "cpus": os.cpu_count()}
    profiles = setup.profiles(cpu)
    workers = setup.data_workers(cpu)
    shards: dict[str, str] = {}

    def make_data() -> dict[str, Any]:
        count, side = (64, 48) if cpu else (1024, 375)  # ImageNet's typical 500 × 375 frame on a GPU
        shards["pattern"] = setup.write_jpeg_shards(tmp / "shards", count, side)
        return {"images": count, "short_side": side, "workers": workers}

    report.run("data: JPEG shards", 60, make_data)
    if "pattern" not in shards:
        return info

    def config(profile: setup.Profile, batch: int, run: str, *extra: str, steps_: int = 2, every: int = 1):
        return profile.config(*setup.run_overrides(shards["pattern"], tmp / run, batch, steps_, every, workers),
                              *extra)

    dino = profiles["dino_vit_s16"]
    report.run("photometric: device = CPU pixels", 40,
               lambda: steps.photometric_on_device(config(dino, 32, "photometric"), device, 32, PHOTOMETRIC_TOLERANCE),
               skip=NO_GPU if cpu else None)

    env_lib.init_alone("gloo" if cpu else "nccl")  # DDP wraps the method: its reducer and NCCL run
    try:
        _step_checks(report, profiles, config, device, cpu)
    finally:
        env_lib.shutdown()  # the throughput runs are single-GPU runs, as a user's would be
    _speed_checks(report, profiles, config, device, cpu, peak, workers)
    return info


def _step_checks(report, profiles, config, device, cpu: bool) -> None:
    for profile in profiles.values():
        _profile_steps(report, profile, config, device, cpu)


def _profile_steps(report, profile, config, device, cpu: bool) -> None:
    base = config(profile, profile.step_batch, f"step-{profile.name}", "engine.precision=bf16")
    batch = steps.real_batch(base, device, profile.step_batch)  # one batch, every engine
    reference: list[float] = []

    def one(engine: str, precision: str, count: int) -> dict[str, Any]:
        cfg = config(profile, profile.step_batch, f"{precision}-{profile.name}-{engine}",
                     f"engine.precision={precision}", *steps.ENGINES[engine])
        result = steps.train_steps(cfg, batch, device, count)
        finite = all(map(_finite, result["losses"]))
        if precision == "fp16":
            # On a GPU the scaler must settle within the steps (overflows halve the scale from
            # 2¹⁶); a CPU's fp16 matmuls overflow far more, so there only the path is exercised.
            applied = count - int(result.get("overflow_steps", 0))
            return {"passed": finite and (cpu or applied > 0), "applied_steps": applied, **result}
        if engine == "ddp":
            reference[:] = result["losses"]
            return {"passed": finite, **result}
        if not reference:
            return {"passed": False, "why": "no DDP losses to compare with", **result}
        same, worst = steps.compare(result["losses"], reference, steps.BF16_TOLERANCE)
        return {"passed": same, "vs_ddp_relative": worst, **result}

    for engine in steps.ENGINES:
        report.run(f"step: {profile.name} {engine} bf16", 20 if cpu else 60,
                   lambda engine=engine: one(engine, "bf16", 2))
        _free(device)
    for engine in ("ddp", "fsdp", "zero2"):
        skip = None
        if engine == "zero2" and profile.name.startswith("dino"):
            skip = "skipped: DeepSpeed's fp16 would keep DINO's EMA teacher in fp16 (bigssl refuses it)"
        elif engine == "zero2" and cpu:
            skip = NO_GPU + " (DeepSpeed's fp16 mode)"
        report.run(f"fp16: {profile.name} {engine} loss scaling, {4 if cpu else 8} steps", 20 if cpu else 45,
                   lambda engine=engine: one(engine, "fp16", 4 if cpu else 8), skip=skip)
        _free(device)


def _speed_checks(report, profiles, config, device, cpu: bool, peak, workers: int) -> None:
    from bigssl.plan.engines import engine_memory
    from bigssl.plan.trace import trace

    # GPU: 8 windows of 5 steps, the first 2 dropped (start-up); compiled runs drop 3 (compilation).
    total, every, skip_eager, skip_compiled = (6, 2, 1, 1) if cpu else (40, 5, 2, 3)
    measured: dict[str, dict[str, Any]] = {}
    for profile in profiles.values():
        batch = profile.speed_batch

        def run(compiled: bool = False, profile=profile, batch=batch) -> dict[str, Any]:
            name = f"train-{profile.name}{'-compiled' if compiled else ''}"
            cfg = config(profile, batch, name, "engine.kind=ddp", f"engine.compile={str(compiled).lower()}",
                         steps_=total, every=every)
            result = speed.trainer_run(cfg, device, skip_compiled if compiled else skip_eager)
            traced = trace(cfg, 1)
            result["flops_per_step"] = traced.flops
            result["mfu"] = speed.mfu(traced.flops, result["images_per_s"], batch, peak)
            result["planned_memory_gib"] = round(engine_memory(traced, "ddp", cfg.optim.name, cfg.engine.precision
                                                               ).total / 2**30, 3)
            result["batch"] = batch
            measured[name] = result
            if compiled and f"train-{profile.name}" in measured:
                eager = measured[f"train-{profile.name}"]["losses"][0]
                result["first_window_loss_vs_eager"] = abs(result["losses"][0] - eager) / max(1e-6, abs(eager))
                return {"passed": all(map(_finite, result["losses"])) and result["torch_linear"]
                        and result["first_window_loss_vs_eager"] < 0.05, **result}
            return {"passed": all(map(_finite, result["losses"])) and result["torch_linear"], **result}

        report.run(f"train: {profile.name} batch {batch}, {workers} workers", 60 if cpu else 75, run)
        _free(device)

        def bare(profile=profile, batch=batch) -> dict[str, Any]:
            cfg = config(profile, batch, f"bare-{profile.name}")
            return speed.bare_loop(cfg, batch, device, 3 if cpu else 15, 1 if cpu else 5)

        report.run(f"bare: {profile.name} batch {batch}", 40 if cpu else 45, bare)
        _free(device)
        _overhead_target(report, profile.name, cpu)
        profile.compiled = run  # kept for the compile checks, last: they are the slowest

    if "train-dino_vit_s16" in measured:
        dino = measured["train-dino_vit_s16"]
        report.run("target: DINO data wait < 10 %", 1,
                   lambda: {"passed": dino["data_wait_fraction"] < DINO_DATA_WAIT,
                            "data_wait_fraction": dino["data_wait_fraction"]}, kind="target", judge=not cpu)
        report.run("target: DINO MFU ≥ 23 %", 1,
                   lambda: {"passed": (dino["mfu"] or 0) >= DINO_MFU, "mfu": dino["mfu"]}, kind="target",
                   skip=NO_GPU if cpu else None)
    simclr = profiles["simclr_resnet50"]
    reference_batch = simclr.speed_batch
    report.run(f"timm: resnet50 supervised train step, batch {reference_batch}", 40,
               lambda: speed.timm_reference("resnet50", reference_batch, device, 15, 5, channels_last=True),
               skip=NO_GPU + " (ResNet-50 at 224 px)" if cpu else None)
    _free(device)
    for profile in profiles.values():
        report.run(f"compile: {profile.name} engine.compile, batch {profile.speed_batch}", 150,
                   lambda profile=profile: profile.compiled(True),
                   skip=NO_GPU + " (inductor on a CPU takes minutes)" if cpu else None)
        _free(device)


def _overhead_target(report, name: str, cpu: bool) -> None:
    trained = report.details(f"train: {name}") or next(
        (c.get("details") for c in report.checks if c["name"].startswith(f"train: {name} ")), None)
    bare = next((c.get("details") for c in report.checks if c["name"].startswith(f"bare: {name} ")), None)
    if not trained or not bare:
        return

    def target() -> dict[str, Any]:
        overhead = bare["images_per_s"] / trained["images_per_s"] - 1
        # Without the time the step waited for data: the trainer's own cost (engine, logging, votes).
        busy = trained["images_per_s"] / max(1e-9, 1 - trained["data_wait_fraction"])
        return {"passed": overhead <= OVERHEAD, "overhead": overhead, "overhead_without_data_wait":
                bare["images_per_s"] / busy - 1, "trainer_images_per_s": trained["images_per_s"],
                "bare_images_per_s": bare["images_per_s"]}

    report.run(f"target: {name} trainer overhead ≤ 5 %", 1, target, kind="target", judge=not cpu)


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
