import math
import re

import pytest
import torch
from torch import nn

from bigssl.config import OptimConfig
from bigssl.errors import ConfigError
from bigssl.optim import LARS, build_optimizer, lr_schedule, param_groups
from bigssl.schedules import WarmupCosine


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2, bias=False))


def test_bias_and_norm_parameters_get_no_weight_decay_nor_adaptation():
    net = small_net()
    decay, no_decay = param_groups(net, OptimConfig(weight_decay=0.1))
    assert {id(p) for p in decay["params"]} == {id(net[0].weight), id(net[2].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(net[0].bias), id(net[1].weight), id(net[1].bias)}
    assert (decay["weight_decay"], decay["lars_adapt"]) == (0.1, True)
    assert (no_decay["weight_decay"], no_decay["lars_adapt"]) == (0.0, False)


def test_lars_update_matches_hand_computation():
    weight = torch.tensor([[3.0, 4.0]])  # ‖w‖ = 5
    bias = torch.tensor([1.0])
    grad_w, grad_b = torch.tensor([[0.6, 0.8]]), torch.tensor([0.5])
    w, b = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())
    opt = LARS([{"params": [w], "weight_decay": 0.1, "lars_adapt": True},
                {"params": [b], "weight_decay": 0.0, "lars_adapt": False}], lr=0.5, momentum=0.9, eta=0.01)
    for _ in range(2):
        w.grad, b.grad = grad_w.clone(), grad_b.clone()
        opt.step()
    # Hand-computed, written out: g' = g + wd·w, trust = η‖w‖/‖g'‖, μ = 0.9μ + trust·g', w -= lr·μ.
    expect_w, momentum = weight.clone(), torch.zeros_like(weight)
    expect_b, momentum_b = bias.clone(), torch.zeros_like(bias)
    for _ in range(2):
        g = grad_w + 0.1 * expect_w
        trust = 0.01 * expect_w.norm() / g.norm()
        momentum = 0.9 * momentum + trust * g
        expect_w = expect_w - 0.5 * momentum
        momentum_b = 0.9 * momentum_b + grad_b
        expect_b = expect_b - 0.5 * momentum_b
    torch.testing.assert_close(w.detach(), expect_w)
    torch.testing.assert_close(b.detach(), expect_b)


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_each_optimizer_lowers_a_simple_loss(name: str):
    net = small_net()
    opt = build_optimizer(net, OptimConfig(name=name, lr=0.05, weight_decay=1e-4))
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    target = torch.randn(16, 2, generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(net(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_warmup_cosine_values():
    schedule = WarmupCosine(peak=1.0, total_steps=110, warmup_steps=10, final=0.1)
    assert schedule(0) == 0.0
    assert schedule(5) == pytest.approx(0.5)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(110) == pytest.approx(0.1)
    assert schedule(500) == pytest.approx(0.1)  # past the end it stays at the floor


def test_step_schedule_warms_up_then_drops_at_its_milestones():
    """MoCo v1's schedule, 10 steps per epoch: ×0.1 at epoch 120 and ×0.01 at 160 of 200."""
    optim = OptimConfig(lr=0.03, warmup_epochs=1, lr_schedule="step", lr_milestones=[120, 160])
    schedule = lr_schedule(optim, steps_per_epoch=10, total_steps=2000)
    assert [schedule(s) for s in (0, 5, 10)] == pytest.approx([0.0, 0.015, 0.03])
    assert [schedule(s) for s in (1199, 1200, 1599, 1600, 1999)] == pytest.approx([0.03, 0.003, 0.003, 3e-4, 3e-4])
    invaspread = OptimConfig(lr=0.03, warmup_epochs=0, lr_schedule="step", lr_milestones=[120, 160, 200],
                             lr_factors=[0.1, 0.05, 0.01])
    assert lr_schedule(invaspread, 1, 300)(170) == pytest.approx(0.0015)


@pytest.mark.parametrize(("keys", "message"), [
    ({"lr_schedule": "linear"}, "optim.lr_schedule: 'linear'"),
    ({"lr_schedule": "step"}, "optim.lr_milestones: []"),
    ({"lr_schedule": "step", "lr_milestones": [160, 120]}, "optim.lr_milestones"),
    ({"lr_schedule": "step", "lr_milestones": [120], "lr_factors": [0.1, 0.01]}, "optim.lr_factors: 2 factors"),
])
def test_bad_lr_schedules_name_their_key(keys: dict, message: str):
    with pytest.raises(ConfigError, match=re.escape(message)):
        lr_schedule(OptimConfig(lr=0.1, **keys), 10, 100)


# A whole tiny run through the trainer, one process: 64 samples an epoch in batches of 16 (4 steps),
# 3 epochs, 8 px views of the quickstart data. Peak lr = base_lr × batch / 256 = 0.8 × 16 / 256.
LR_STEPS_PER_EPOCH, LR_EPOCHS, LR_PEAK, PROBE_LR = 4, 3, 0.05, 0.1
LR_RUNS = {  # name: (overrides, warm-up steps = round(warmup_epochs × 4), written out)
    "cosine": (["optim.warmup_epochs=1.4", "optim.min_lr=0.002", "optim.no_decay_lr_scale=0.5"], 6),
    "linspace-from-start-to-a-fraction": (["optim.warmup_epochs=1", "optim.warmup_includes_peak=true",
                                           "optim.warmup_start_lr=0.01", "optim.min_lr_fraction=0.1"], 4),
    "per-epoch": (["optim.warmup_epochs=2", "optim.lr_per_epoch=true", "optim.min_lr=0.001"], 8),
}


def _official_lr(step: int, warmup: int, options: dict) -> float:
    """The lr of step `step` as the official codes write it: a linear warm-up from the start lr,
    reaching the peak at step `warmup` (MoCo v3, BYOL, SimCLR) or, as np.linspace(start, peak,
    warmup), at its last step (DINO, SwAV); then peak → final over the remaining steps along
    final + ½(peak − final)(1 + cos(π·t/T)); per epoch (MoCo v2, SimSiam): the epoch's first step's."""
    import numpy as np

    total = LR_STEPS_PER_EPOCH * LR_EPOCHS
    if options.get("optim.lr_per_epoch") == "true":
        step = LR_STEPS_PER_EPOCH * (step // LR_STEPS_PER_EPOCH)
    start = float(options.get("optim.warmup_start_lr", 0.0))
    final = (float(options["optim.min_lr_fraction"]) * LR_PEAK if "optim.min_lr_fraction" in options
             else float(options["optim.min_lr"]))
    if step < warmup:
        if options.get("optim.warmup_includes_peak") == "true":
            return float(np.linspace(start, LR_PEAK, warmup)[step])
        return start + (LR_PEAK - start) * step / warmup
    return final + 0.5 * (LR_PEAK - final) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("case", sorted(LR_RUNS))
def test_a_whole_run_steps_with_the_scheduled_lr_at_every_step(tmp_path, case: str):
    """The lr every parameter group stepped with, logged at every step of a whole run (record k holds
    step k − 1's), against the official formula: the decaying weights at the schedule, the biases
    and norms at optim.no_decay_lr_scale of it, the online probe at the schedule × probe_lr / peak."""
    import json

    from helpers import QUICKSTART, SMALL

    from bigssl import config as config_lib
    from bigssl.train import train

    overrides, warmup = LR_RUNS[case]
    run = tmp_path / "run"
    train(config_lib.load(QUICKSTART, [
        *SMALL, "model.backbone_args.channels=[4,4,4,4]", "data.views.size=8", "data.views.resize=8",
        "data.samples_per_epoch=64", "optim.batch_size=16", f"optim.epochs={LR_EPOCHS}", "optim.base_lr=0.8",
        "optim.lr_scaling=linear", "data.workers=0", "eval.online_probe_classes=10", f"eval.online_probe_lr={PROBE_LR}",
        "eval.knn_baseline=false", "eval.knn_at_end=false", "eval.knn_pixels=false", "log.tensorboard=false",
        "log.progress=false", "checkpoint.every_steps=0", f"log.dir={run}", *overrides]))
    records = [r for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in (r := json.loads(line))]
    assert [r["step"] for r in records] == list(range(1, LR_STEPS_PER_EPOCH * LR_EPOCHS + 1))
    options = dict(o.split("=", 1) for o in overrides)
    no_decay_scale = float(options.get("optim.no_decay_lr_scale", 1.0))
    for record in records:
        lr = _official_lr(record["step"] - 1, warmup, options)
        assert record["lr"] == pytest.approx(lr, rel=1e-12, abs=1e-15), record["step"]
        assert record["lr/decay"] == pytest.approx(lr, rel=1e-12, abs=1e-15), record["step"]
        assert record["lr/no_decay"] == pytest.approx(lr * no_decay_scale, rel=1e-12, abs=1e-15), record["step"]
        assert record["lr/online_probe"] == pytest.approx(lr * PROBE_LR / LR_PEAK, rel=1e-12, abs=1e-15)
