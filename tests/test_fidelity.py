"""The training step of DINO and SwAV against their official code, written out here from it
(facebookresearch/dino main_dino.py, utils.py, vision_transformer.py; facebookresearch/swav
main_swav.py; NVIDIA apex LARC): frozen parameters, position tables, last-layer init,
schedules, LARC, prototype rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from engine_cases import BATCH, full, make_config, setup
from torch import nn

from bigssl.config import OptimConfig
from bigssl.models.vit_positions import dino_position_table
from bigssl.optim import LARS, GroupSettings, ParamRule, build_optimizer, lr_schedule

# ----------------------------------------------------------------------------- frozen groups


def net_and_grads(seed: int = 0) -> tuple[nn.Module, list[list[torch.Tensor]]]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 3), nn.GELU(), nn.Linear(3, 5, bias=False))
    generator = torch.Generator().manual_seed(seed + 1)
    grads = [[torch.randn(p.shape, generator=generator) for p in net.parameters()] for _ in range(4)]
    return net, grads


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_a_frozen_group_is_left_out_of_the_step_as_a_gradient_of_none_is(name: str):
    """Ours: the trainer marks the group frozen for 2 steps. Official (DINO, SwAV): the frozen
    parameter's gradient is set to None, so the optimizer skips it: no update, no weight decay,
    and its moments, momentum buffer and step count start when the freeze ends."""
    config = OptimConfig(name=name, lr=0.1, weight_decay=0.05, exclude_bias_norm=False)
    ours, grads = net_and_grads()
    optimizer = build_optimizer(ours, config, rules=[ParamRule("2.", frozen_steps=2)])
    reference, _ = net_and_grads()
    reference_groups = [{"params": list(reference[0].parameters()), "weight_decay": 0.05},
                        {"params": [reference[2].weight], "weight_decay": 0.05}]
    plain = {"adamw": lambda: torch.optim.AdamW(reference_groups, lr=0.1),
             "sgd": lambda: torch.optim.SGD(reference_groups, lr=0.1, momentum=0.9),
             "lars": lambda: LARS(reference_groups, lr=0.1, momentum=0.9)}[name]()
    for step, step_grads in enumerate(grads):
        for group in optimizer.param_groups:
            group["frozen"] = step < GroupSettings.of(group).frozen_steps
        for p, q, g in zip(ours.parameters(), reference.parameters(), step_grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        if step < 2:
            reference[2].weight.grad = None
        optimizer.step()
        plain.step()
        for p, q in zip(ours.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        if step < 2:
            assert optimizer.state[ours[2].weight] == {}  # nothing built while frozen
    if name == "adamw":  # two unfrozen steps for the layer, four for the rest
        assert int(optimizer.state[ours[2].weight]["step"]) == 2
        assert int(optimizer.state[ours[0].weight]["step"]) == 4


DINO_TINY = ["method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16",
             "model.backbone_args.dynamic_img_size=true", "optim.name=adamw", "optim.lr=0.01",
             "optim.weight_decay=0.04", "method.freeze_last_layer_epochs=2", "optim.clip_grad=0"]
ENGINES = {"ddp": ["engine.kind=ddp"], "fsdp": ["engine.kind=fsdp"],
           **{f"zero{s}": ["engine.kind=deepspeed", f"engine.zero_stage={s}"] for s in (1, 2, 3)}}


def dino_batch(step: int) -> dict:
    generator = torch.Generator().manual_seed(step)
    return {"views": [torch.rand((2, BATCH, 3, 32, 32), generator=generator),
                      torch.rand((2, BATCH, 3, 16, 16), generator=generator)]}


def dino_run(engine_keys: list[str]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """4 steps, the last layer frozen for the first 2: its weight after each step, and every
    student parameter at the end (whole)."""
    engine = setup(make_config("dino", *DINO_TINY, *engine_keys), 0, 1)
    method = engine.method
    last_layer = []
    for step in range(4):
        for group in engine.optimizer.param_groups:
            group["frozen"] = step < GroupSettings.of(group).frozen_steps
        out = engine.forward(dino_batch(step), step)
        engine.backward(out.loss)
        engine.step()
        last_layer.append(full(method.head.last_layer.weight))
    params = {n: full(p) for n, p in method.named_parameters() if p.requires_grad}
    return last_layer, params


@pytest.fixture(scope="module")
def dino_ddp():
    return dino_run(ENGINES["ddp"])


@pytest.mark.parametrize("engine", ENGINES)
def test_dinos_last_layer_stays_frozen_and_then_trains_alike_under_every_engine(engine: str, dino_ddp):
    torch.manual_seed(0)
    initial = setup(make_config("dino", *DINO_TINY), 0, 1).method.head.last_layer.weight.detach().clone()
    last_layer, params = dino_run(ENGINES[engine]) if engine != "ddp" else dino_ddp
    torch.testing.assert_close(last_layer[0], initial, rtol=0, atol=0)
    torch.testing.assert_close(last_layer[1], initial, rtol=0, atol=0)
    assert not torch.equal(last_layer[2], initial)  # the first unfrozen step moves it
    for name, value in params.items():
        torch.testing.assert_close(value, dino_ddp[1][name], rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- DINO


def bicubic_kernel(distance: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel (a = −0.75, the one PyTorch's bicubic uses)."""
    d = np.abs(distance)
    return np.where(d <= 1, (a + 2) * d**3 - (a + 3) * d**2 + 1,
                    np.where(d < 2, a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a, 0.0))


def bicubic_matrix(size_in: int, size_out: int, scale: float) -> np.ndarray:
    """Rows: output positions; source coordinate (i + ½)/scale − ½ (align_corners off, the given
    factor used as is), 4 taps, indices clamped at the border."""
    matrix = np.zeros((size_out, size_in))
    for i in range(size_out):
        source = (i + 0.5) / scale - 0.5
        base = math.floor(source)
        for tap in range(base - 1, base + 3):
            matrix[i, min(max(tap, 0), size_in - 1)] += bicubic_kernel(np.array(source - tap))
    return matrix


@pytest.mark.parametrize("grid", [(6, 6), (4, 7)])
def test_dino_position_table_is_the_official_bicubic_interpolation(grid: tuple[int, int]):
    side, width = 14, 5
    table = torch.randn(1, 1 + side * side, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = dino_position_table(table, grid)
    rows = bicubic_matrix(side, grid[0], (grid[0] + 0.1) / side)
    columns = bicubic_matrix(side, grid[1], (grid[1] + 0.1) / side)
    square = table[0, 1:].reshape(side, side, width).numpy()
    expected = np.einsum("ri,cj,ijw->rcw", rows, columns, square).reshape(-1, width)
    np.testing.assert_allclose(ours[0, 1:].numpy(), expected, rtol=1e-9, atol=1e-12)
    assert torch.equal(ours[0, 0], table[0, 0])  # the class position untouched
    assert dino_position_table(table, (side, side)) is table
    # timm's resampling (size=, antialias) is measurably another table.
    from timm.layers import resample_abs_pos_embed

    timm_table = resample_abs_pos_embed(table.float(), new_size=list(grid), num_prefix_tokens=1)
    assert (timm_table[0, 1:].double() - ours[0, 1:]).abs().max() > 0.05


def test_dinos_vit_adds_the_official_table_on_local_crops():
    engine = setup(make_config("dino", *DINO_TINY), 0, 1)
    for backbone in (engine.method.backbone, engine.method.teacher_backbone):
        tokens = torch.randn(2, 2, 2, 32)  # [B, rows, columns, C]: a 16 px crop in 8 px patches
        expected = torch.cat([backbone.cls_token.expand(2, -1, -1), tokens.reshape(2, 4, 32)], dim=1)
        expected = expected + dino_position_table(backbone.pos_embed, (2, 2))
        torch.testing.assert_close(backbone._pos_embed(tokens), expected, rtol=0, atol=0)
    state = engine.method.backbone.state_dict()
    assert "pos_embed" in state and not any("DINO" in k for k in state)  # timm's names, unchanged


def test_dino_last_layer_starts_with_nn_linears_init():
    """Official: the weight-normalised layer is made after the MLP's trunc-normal init, so it
    keeps nn.Linear's U(±1/√in): std 1/√(3·in) (0.036 at 256 inputs)."""
    engine = setup(make_config("dino", *DINO_TINY, "method.out_dim=4096", "method.bottleneck_dim=256"), 0, 1)
    weight = engine.method.head.last_layer.weight.detach()
    bound = 1 / math.sqrt(256)
    assert weight.abs().max() <= bound
    assert weight.std().item() == pytest.approx(1 / math.sqrt(3 * 256), rel=0.01)
    mlp = engine.method.head.mlp[0].weight.detach()
    assert mlp.std().item() == pytest.approx(0.02, rel=0.1)  # the MLP: trunc-normal 0.02
    cls_token = engine.method.backbone.cls_token.detach()  # official trunc-normal 0.02, not timm's 1e-6
    assert 0.005 < cls_token.std().item() < 0.04
    assert torch.equal(engine.method.teacher_backbone.cls_token, cls_token)


def official_cosine_scheduler(base: float, final: float, epochs: int, per_epoch: int, warmup_epochs: int,
                              start: float = 0.0) -> np.ndarray:
    """facebookresearch/dino utils.cosine_scheduler, written out: np.linspace warm-up (its end
    point included), then a cosine over the remaining iterations."""
    warmup = np.linspace(start, base, warmup_epochs * per_epoch) if warmup_epochs else np.array([])
    iters = np.arange(epochs * per_epoch - len(warmup))
    return np.concatenate([warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))])


@pytest.mark.parametrize(("start", "final"), [(0.0, 1e-5), (0.3, 0.0048)])  # DINO; SwAV (start_warmup 0.3)
def test_warmup_including_its_peak_is_the_official_linspace_schedule(start: float, final: float):
    config = OptimConfig(lr=4.8, min_lr=final, warmup_epochs=3, warmup_start_lr=start, warmup_includes_peak=True)
    schedule = lr_schedule(config, steps_per_epoch=7, total_steps=70)
    official = official_cosine_scheduler(4.8, final, 10, 7, 3, start)
    np.testing.assert_allclose([schedule(s) for s in range(70)], official, rtol=1e-12, atol=1e-15)
    assert schedule(20) == pytest.approx(4.8)  # the warm-up's last step is at the peak


# ----------------------------------------------------------------------------- SwAV


def test_larc_update_is_apexs_rule_written_out():
    """apex LARC (clip off) around SGD: for each tensor with ‖w‖, ‖g‖ > 0,
    g ← (g + wd·w) · η‖w‖/(‖g‖ + wd‖w‖ + 1e-8); else g unchanged (no decay); then SGD."""
    weight, zero = torch.tensor([[3.0, 4.0], [0.0, 1.0]]), torch.zeros(3)
    grads = [(torch.tensor([[0.6, -0.8], [0.1, 0.2]]), torch.tensor([0.5, -1.0, 2.0])),
             (torch.tensor([[0.2, 0.1], [-0.3, 0.4]]), torch.tensor([0.1, 0.0, -0.2]))]
    w, b = nn.Parameter(weight.clone()), nn.Parameter(zero.clone())
    optimizer = LARS([{"params": [w, b], "weight_decay": 0.1}], lr=0.5, momentum=0.9, eta=0.02, rule="larc")
    expected = {"w": weight.clone(), "b": zero.clone()}
    buffers: dict[str, torch.Tensor] = {}
    for grad_w, grad_b in grads:
        w.grad, b.grad = grad_w.clone(), grad_b.clone()
        optimizer.step()
        for key, grad in (("w", grad_w), ("b", grad_b)):
            value = expected[key]
            if value.norm() > 0 and grad.norm() > 0:
                rate = 0.02 * value.norm() / (grad.norm() + 0.1 * value.norm() + 1e-8)
                grad = (grad + 0.1 * value) * rate
            buffers[key] = grad.clone() if key not in buffers else 0.9 * buffers[key] + grad
            expected[key] = value - 0.5 * buffers[key]
    torch.testing.assert_close(w.detach(), expected["w"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.detach(), expected["b"], rtol=1e-6, atol=1e-7)
    assert not torch.equal(b.detach(), zero)  # the zero-norm tensor still moved by its raw gradient


SWAV_TINY = ["method.prototypes=24", "model.backbone_args.dynamic_img_size=true", "optim.name=lars",
             "optim.lars_rule=larc", "optim.exclude_bias_norm=false", "method.freeze_prototypes_epochs=0",
             "optim.clip_grad=0"]


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero2", "zero3"])
def test_swav_prototype_rows_are_unit_where_they_are_stored(engine: str):
    """Official SwAV rescales the stored prototype rows before every forward; a ZeRO engine
    must do it in its fp32 master copy too, or the next step writes the old rows back."""
    engine_obj = setup(make_config("swav", *SWAV_TINY, *ENGINES[engine]), 0, 1)
    method = engine_obj.method
    prototypes = method.prototypes.weight
    torch.testing.assert_close(full(prototypes).norm(dim=1), torch.ones(24), rtol=1e-6, atol=0)  # from the start
    for step in range(2):
        engine_obj.normalise_rows(method.unit_norm_rows())
        rows = full(prototypes)
        torch.testing.assert_close(rows.norm(dim=1), torch.ones(24), rtol=1e-6, atol=0)
        generator = torch.Generator().manual_seed(step)
        out = engine_obj.forward({"views": [torch.rand((2, BATCH, 3, 32, 32), generator=generator),
                                            torch.rand((2, BATCH, 3, 16, 16), generator=generator)]}, step)
        engine_obj.backward(out.loss)
        engine_obj.step()
        moved = full(prototypes)
        assert not torch.allclose(moved.norm(dim=1), torch.ones(24), rtol=1e-7, atol=0)  # the step moved them
    if engine.startswith("zero"):
        from deepspeed.utils import safe_get_full_fp32_param

        engine_obj.normalise_rows(method.unit_norm_rows())
        master = safe_get_full_fp32_param(prototypes)
        torch.testing.assert_close(master.norm(dim=1), torch.ones(24), rtol=1e-6, atol=0)
        torch.testing.assert_close(master, full(prototypes), rtol=1e-6, atol=1e-7)
