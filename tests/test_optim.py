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
