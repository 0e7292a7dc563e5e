import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from bigssl.config import OptimConfig
from bigssl.distributed.engines.deepspeed_zero import stage3_segments
from bigssl.errors import ConfigError
from bigssl.optim import LARS, FlatLayout, Segment, build_optimizer, lr_schedule, param_groups
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


# ZeRO's flat partitions on a fake 2-rank group: five tensors of different scales (one all zeros,
# for LARC's fallback) and garbage in the padding, which no norm may see.
SHAPES, RANKS, PADDING = [(3, 4), (5,), (2, 3, 2), (1,), (6,)], 2, 1e3
Pieces = list[tuple[Segment, int]]  # a segment and where its elements start in their tensor


def _stage12_partitions(numels: list[int]) -> list[tuple[int, Pieces]]:
    """(width, pieces) per rank: the tensors one after another, cut into equal partitions."""
    width = -(-(sum(numels) + 1) // RANKS)  # one padding element at least, on the last rank
    starts = [sum(numels[:i]) for i in range(len(numels))]
    partitions = []
    for rank in range(RANKS):
        low, high = rank * width, (rank + 1) * width
        spans = [(i, start, max(start, low), min(start + n, high))
                 for i, (start, n) in enumerate(zip(starts, numels, strict=True))]
        partitions.append((width, [(Segment(first - low, last - first, i), first - start)
                                   for i, start, first, last in spans if first < last]))
    return partitions


def _stage3_partitions(numels: list[int]) -> list[tuple[int, Pieces]]:
    """Through the engine's own ZeRO-3 arithmetic: every tensor cut in RANKS equal pieces."""
    sizes = [(n, -(-n // RANKS)) for n in numels]
    partitions = []
    for rank in range(RANKS):
        segments, width = stage3_segments(sizes, rank)
        partitions.append((width, [(s, rank * sizes[s.index][1]) for s in segments]))
    return partitions


def _scatter(tensors: list[torch.Tensor], width: int, pieces: Pieces) -> torch.Tensor:
    flat = torch.full((width,), PADDING, dtype=torch.float64)
    for segment, first in pieces:
        values = tensors[segment.index].flatten()
        flat[segment.offset:segment.offset + segment.numel] = values[first:first + segment.numel]
    return flat


def _gather(flats: list[torch.Tensor], partitions: list[tuple[int, Pieces]]) -> list[torch.Tensor]:
    wholes = [torch.full((math.prod(shape),), math.nan, dtype=torch.float64) for shape in SHAPES]
    for flat, (_, pieces) in zip(flats, partitions, strict=True):
        for segment, first in pieces:
            wholes[segment.index][first:first + segment.numel] = flat[segment.offset:segment.offset + segment.numel]
    return [whole.view(shape) for whole, shape in zip(wholes, SHAPES, strict=True)]


class ThreadAllReduce:
    """An all-reduce between threads, one per fake rank: every caller gets the ranks' sum."""

    def __init__(self) -> None:
        self.barrier, self.parts = threading.Barrier(RANKS, timeout=60), [None] * RANKS

    def for_rank(self, rank: int):
        def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = values.clone()
            self.barrier.wait()
            total = sum(self.parts[1:], self.parts[0].clone())
            self.barrier.wait()  # nobody overwrites a part before all have summed
            return total

        return sum_over_ranks


@pytest.mark.parametrize("partitioned", [_stage12_partitions, _stage3_partitions], ids=["zero12", "zero3"])
@pytest.mark.parametrize("rule", ["lars", "larc"])
def test_lars_on_flat_partitions_takes_each_whole_tensors_norms(partitioned, rule: str):
    """Each rank's LARS steps its flat partition, given the segment table; put back together, the
    tensors are those of LARS on the whole tensors (3 steps, weight decay, momentum). In float64,
    so that the updates, not the weights' rounding, are compared."""
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator, dtype=torch.float64) * (i + 1) for i, shape in enumerate(SHAPES)]
    weights[1].zero_()
    grads = [[torch.randn(shape, generator=generator, dtype=torch.float64) / (i + 2) for i, shape in enumerate(SHAPES)]
             for _ in range(3)]
    options = {"lr": 0.5, "momentum": 0.9, "eta": 0.02, "rule": rule}
    whole = [nn.Parameter(w.clone()) for w in weights]
    reference = LARS([{"params": whole, "weight_decay": 0.1}], **options)
    partitions = partitioned([w.numel() for w in weights])
    flats = [nn.Parameter(_scatter(weights, width, pieces)) for width, pieces in partitions]
    reduce = ThreadAllReduce()
    optimizers = []
    for rank, (flat, (_, pieces)) in enumerate(zip(flats, partitions, strict=True)):
        optimizers.append(LARS([{"params": [flat], "weight_decay": 0.1}], **options))
        layout = FlatLayout(tuple(segment for segment, _ in pieces), len(SHAPES), reduce.for_rank(rank))
        optimizers[-1].set_flat_layout(flat, layout)
    for step_grads in grads:
        for param, grad in zip(whole, step_grads, strict=True):
            param.grad = grad.clone()
        reference.step()
        for flat, (width, pieces) in zip(flats, partitions, strict=True):
            flat.grad = _scatter(step_grads, width, pieces)
        with ThreadPoolExecutor(RANKS) as pool:  # every rank steps at once: they meet in the all-reduce
            list(pool.map(LARS.step, optimizers))
    for got, want, start in zip(_gather([f.detach() for f in flats], partitions), whole, weights, strict=True):
        # the whole update, against norms summed from pieces in another order
        torch.testing.assert_close(got - start, want.detach() - start, rtol=1e-12, atol=0)
    assert not torch.equal(whole[1].detach(), weights[1])  # the zero tensor moved (LARC: by its raw gradient)


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

    from bigssl import recipes
    from bigssl.train import train

    overrides, warmup = LR_RUNS[case]
    run = tmp_path / "run"
    train(recipes.load(QUICKSTART, [
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
