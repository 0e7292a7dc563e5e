"""fp16 dynamic loss scaling: the scale schedule, true-sized gradients before clipping, skipped
overflow steps, agreement across ranks when only one rank's shard overflows, and checkpoints.

fp16 training is GPU-only; BIGSSL_ALLOW_CPU_FP16=1 lets these tests run the same code on CPU
(CPU autocast supports fp16)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from engine_cases import make_config, rank_batch, save_result, setup
from helpers import QUICKSTART, SMALL, run_cli, run_distributed, worker_env

from bigssl.distributed import comm
from bigssl.distributed.engines.base import CPU_FP16_ENV
from bigssl.distributed.engines.loss_scale import DynamicLossScaler
from bigssl.errors import ConfigError


@pytest.fixture
def cpu_fp16(monkeypatch):
    monkeypatch.setenv(CPU_FP16_ENV, "1")


def test_scale_halves_on_overflow_and_doubles_after_clean_interval():
    scaler = DynamicLossScaler(init_scale=8.0, growth_interval=3, min_scale=2.0)
    for _ in range(2):
        scaler.update(finite=True)
    assert scaler.scale == 8.0
    scaler.update(finite=False)  # resets the clean run
    assert (scaler.scale, scaler.overflow_steps) == (4.0, 1)
    for _ in range(3):
        scaler.update(finite=True)
    assert scaler.scale == 8.0
    for _ in range(5):
        scaler.update(finite=False)
    assert scaler.scale == 2.0  # never below min_scale


def test_unscale_divides_and_flags_non_finite_values():
    scaler = DynamicLossScaler(init_scale=4.0)
    grads = [torch.tensor([4.0, -8.0]), torch.tensor([2.0], dtype=torch.float16)]
    assert scaler.unscale_(grads)
    torch.testing.assert_close(grads[0], torch.tensor([1.0, -2.0]))
    assert grads[1].item() == 0.5
    for bad in (math.inf, math.nan):
        assert not scaler.unscale_([torch.tensor([1.0]), torch.tensor([bad])])


def test_loss_scale_init_must_be_a_power_of_two():
    with pytest.raises(ConfigError, match="engine.loss_scale_init: 48.0 is not a power of two"):
        make_config("simclr", "engine.loss_scale_init=48")


def test_fp16_is_refused_without_a_gpu(monkeypatch):
    monkeypatch.delenv(CPU_FP16_ENV, raising=False)
    with pytest.raises(ConfigError, match="engine.precision: fp16 needs a GPU"):
        setup(make_config("simclr", "engine.precision=fp16"), 0, 1)


def _norm_and_params_after_one_step(*keys: str) -> tuple[float, list[torch.Tensor]]:
    """The first step that is taken: overflowing steps (the scale starts at 2¹⁶ and halves each
    time) leave parameters and optimizer state as they were, so it is the fp32 run's first step."""
    engine = setup(make_config("simclr", *keys), 0, 1)
    for _ in range(30):
        out = engine.forward(rank_batch(0, 0), 0)
        engine.backward(out.loss)
        norm = engine.step()
        if math.isfinite(norm):
            return norm, [p.detach().clone() for p in engine.method.parameters()]
    raise AssertionError("no finite step in 30 tries")


def test_fp16_gradients_are_unscaled_before_clipping(cpu_fp16):
    """An fp16 step lands where an fp32 step does (to fp16 accuracy): the scale 2¹⁶ is taken out
    before the gradient norm is measured and clipped at optim.clip_grad=1.0."""
    norm32, params32 = _norm_and_params_after_one_step()
    norm16, params16 = _norm_and_params_after_one_step("engine.precision=fp16")
    assert norm32 > 1.0  # so the clip is active
    assert norm16 == pytest.approx(norm32, rel=2e-2)
    initial = _norm_and_params_after_one_step("optim.lr=0")[1]
    moved32 = torch.cat([(a - b).flatten() for a, b in zip(params32, initial, strict=True)])
    moved16 = torch.cat([(a - b).flatten() for a, b in zip(params16, initial, strict=True)])
    assert moved32.norm() > 0
    assert (moved16 - moved32).norm() / moved32.norm() < 2e-2


def _poison_local_gradient(engine, rank_with_inf: int) -> None:
    """An overflow in one rank's part of one gradient, as after a reduce-scatter."""
    if comm.rank() == rank_with_inf:
        local = next(g for p in engine.method.parameters() if p.grad is not None
                     and (g := engine.local_tensor(p.grad)).numel() > 0)
        local.view(-1)[0] = math.inf


def _overflow_then_clean_step(rank: int, world_size: int, kind: str, out: Path) -> None:
    assert comm.world_size() == world_size
    # A scale this model's gradients do not overflow at, so the only overflow is the injected one.
    engine = setup(make_config("simclr", f"engine.kind={kind}", "engine.precision=fp16",
                               "engine.loss_scale_init=64"), rank, world_size)
    before = [engine.local_tensor(p).clone() for p in engine.method.parameters()]
    out_ = engine.forward(rank_batch(rank, 0), 0)
    engine.backward(out_.loss)
    _poison_local_gradient(engine, rank_with_inf=world_size - 1)
    skipped_norm = engine.step()
    after_skip = [engine.local_tensor(p).clone() for p in engine.method.parameters()]
    metrics_after_skip = engine.metrics()
    momentum_buffers_after_skip = len(engine.optimizer.state)  # SGD creates them at its first step
    out_ = engine.forward(rank_batch(rank, 1), 1)
    engine.backward(out_.loss)
    clean_norm = engine.step()
    after_clean = [engine.local_tensor(p).clone() for p in engine.method.parameters()]
    save_result(out, rank, {
        "unchanged_by_skip": all(torch.equal(a, b) for a, b in zip(before, after_skip, strict=True)),
        "moved_by_clean": any(not torch.equal(a, b) for a, b in zip(after_skip, after_clean, strict=True)),
        "momentum_buffers_after_skip": momentum_buffers_after_skip, "skipped_norm": skipped_norm,
        "clean_norm": clean_norm, "metrics_after_skip": metrics_after_skip,
        "metrics": engine.metrics()})


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_an_overflow_on_one_rank_skips_the_step_on_every_rank(tmp_path: Path, kind: str, monkeypatch):
    """Under FSDP2 only the rank owning the overflowing shard sees the inf; every rank must
    still skip, or the replicas part ways."""
    monkeypatch.setenv(CPU_FP16_ENV, "1")
    run_distributed(_overflow_then_clean_step, 2, kind, tmp_path)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for result in results:
        assert result["unchanged_by_skip"]
        assert result["moved_by_clean"]
        assert result["momentum_buffers_after_skip"] == 0
        assert math.isfinite(result["clean_norm"])
        assert result["metrics_after_skip"] == result["metrics"] == {"loss_scale": 32.0, "overflow_steps": 1.0}
    assert not math.isfinite(results[1]["skipped_norm"])  # the poisoned rank's (all ranks' under FSDP2)


def test_loss_scale_survives_a_checkpoint(tmp_path: Path, cpu_fp16):
    engine = setup(make_config("simclr", "engine.precision=fp16"), 0, 1)
    out = engine.forward(rank_batch(0, 0), 0)
    engine.backward(out.loss)
    _poison_local_gradient(engine, rank_with_inf=0)
    engine.step()
    engine.save(tmp_path, {"step": 1})
    resumed = setup(make_config("simclr", "engine.precision=fp16"), 0, 1)
    assert resumed.metrics()["loss_scale"] == 2.0**16
    assert resumed.load(tmp_path) == {"step": 1}
    assert resumed.metrics() == engine.metrics() == {"loss_scale": 2.0**15, "overflow_steps": 1.0}


def test_deepspeed_fp16_refuses_an_ema_teacher_it_would_store_in_fp16(cpu_fp16):
    with pytest.raises(ConfigError, match="EMA teacher in fp16"):
        setup(make_config("test_tiny_ema", "engine.kind=deepspeed", "engine.precision=fp16"), 0, 1)


def test_trainer_logs_the_loss_scale_and_its_overflows(tmp_path: Path):
    """The whole trainer in fp16: a scale far too large overflows at first, each overflow halves
    it, and metrics.jsonl records both at every log step."""
    run = tmp_path / "run"
    env = {**worker_env(), CPU_FP16_ENV: "1"}
    result = run_cli("train", str(QUICKSTART), *SMALL, f"log.dir={run}", "optim.max_steps=6",
                     "engine.precision=fp16", f"engine.loss_scale_init={2.0**40}", "eval.knn_at_end=false",
                     "eval.knn_baseline=false", env=env)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[0]["overflow_steps"] == 1  # 2⁴⁰ overflows fp16 (max 65504) whatever the gradient
    for record in steps:
        assert record["loss_scale"] == 2.0**40 / 2 ** record["overflow_steps"]
        assert math.isfinite(record["loss"])
    # Even 2⁴⁰ halved six times (2³⁴) times a loss of ≈ 5 lies far above fp16's 65504: every one of
    # the six steps overflows, is skipped, and halves the scale.
    assert [r["overflow_steps"] for r in steps] == [1, 2, 3, 4, 5, 6]
