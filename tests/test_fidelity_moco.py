"""A step of bigssl equals the official code's step (issue 17): MoCo v3's ViT init and its
momentum index through the real trainer, BYOL's target index, each view policy's crop
interpolation, each ImageNet ResNet recipe's last-BN init, Barlow Twins' lr schedule at any batch,
and the per-epoch cosines of MoCo v2 and SimSiam. Every expectation is the official rule written
out here, not a recorded value; the file:line each follows is in the recipe or module named."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import yaml
from engine_cases import make_config, setup
from helpers import SMALL, fair_warmup_cosine
from torch import nn

from bigssl import recipes
from bigssl.data import geometry as geo
from bigssl.data.views import Geometry
from bigssl.methods.byol import BYOL
from bigssl.methods.mocov3 import MoCoV3, sincos_position_table
from bigssl.methods.policies import POLICIES
from bigssl.models.backbones import build_backbone
from bigssl.optim import lr_schedule
from bigssl.train import train

REPO = Path(__file__).resolve().parents[1]
IMAGENET = REPO / "recipes" / "imagenet"
# Wide enough that a weight matrix has thousands of entries: its sample statistics then tell the
# bounds apart (the qkv bound is √2 times the plain Xavier one at this shape).
VIT = ["model.backbone=vit_tiny_patch16_224", "model.channels_last=false",
       "model.backbone_args={img_size: 32, patch_size: 8, embed_dim: 64, depth: 1, num_heads: 2}",
       "model.projector.hidden_dim=32", "model.projector.out_dim=16", "method.predictor_hidden_dim=32"]


def assert_uniform_on(weight: torch.Tensor, bound: float) -> None:
    """Every entry within ±bound; the largest within 25/N of it (a uniform sample of N entries falls
    short of that with probability (1 − 25/N)^N < 1e-10); variance bound²/3 within six standard
    errors (a uniform's squared entries have relative spread √0.8)."""
    values = weight.detach().double().flatten()
    count = values.numel()
    largest = values.abs().max().item()
    assert largest <= bound * (1 + 1e-6), f"an entry {largest:.5f} outside ±{bound:.5f}"
    assert largest >= bound * (1 - 25 / count), f"entries reach {largest:.5f}, not the bound {bound:.5f}"
    variance = values.pow(2).mean().item()
    assert variance == pytest.approx(bound**2 / 3, rel=6 * math.sqrt(0.8 / count))


def test_mocov3_vit_init_is_the_official_xavier_with_qkv_split_in_three():
    """vits.py:32-51: Xavier-uniform on every Linear of the trunk, qkv as three layers
    (±√(6/(out/3 + in))), zero biases, class token N(0, 1e-6²), patch projection uniform on
    ±√(6/(C·p·p + D)) and frozen. The heads keep nn.Linear's init (builder.py:42)."""
    method = setup(make_config("mocov3", *VIT), 0, 1).method
    backbone = method.backbone
    linears = {name: m for name, m in backbone.named_modules() if isinstance(m, nn.Linear)}
    assert {name.split(".")[-1] for name in linears} == {"qkv", "proj", "fc1", "fc2"}
    for name, linear in linears.items():
        fan_out, fan_in = linear.weight.shape
        if name.endswith("qkv"):
            fan_out //= 3
        assert_uniform_on(linear.weight, math.sqrt(6 / (fan_out + fan_in)))
        assert torch.count_nonzero(linear.bias) == 0
    cls = backbone.cls_token.detach().double()
    assert cls.abs().max() < 1e-5 and 0.5e-6 < cls.std() < 2e-6
    proj = backbone.patch_embed.proj
    channels, patch = proj.weight.shape[1], proj.weight.shape[-1]
    assert_uniform_on(proj.weight, math.sqrt(6 / (channels * patch * patch + proj.weight.shape[0])))
    assert torch.count_nonzero(proj.bias) == 0 and not proj.weight.requires_grad and not proj.bias.requires_grad
    # nn.Linear's own init, U(±1/√in), in the heads; every head Linear without bias, the
    # predictor ending in BN without affine (builder.py:36-52, 112-122).
    for head in (method.projector, method.predictor):
        for linear in (m for m in head if isinstance(m, nn.Linear)):
            assert_uniform_on(linear.weight, 1 / math.sqrt(linear.weight.shape[1]))
            assert linear.bias is None
    assert isinstance(method.predictor[-1], nn.BatchNorm1d) and not method.predictor[-1].affine


def test_mocov3_resnet_predictor_ends_in_a_linear_without_bias():
    """builder.py:109: the ResNet predictor is _build_mlp(..., last_bn=False), bias-free Linears."""
    config = recipes.load(None, ["method.name=mocov3", "model.backbone=resnet18", "method.predictor_hidden_dim=16",
                                    *SMALL[:3]])
    method = setup(config, 0, 1).method
    assert isinstance(method.predictor[-1], nn.Linear) and method.predictor[-1].bias is None


def test_sincos_table_on_a_non_square_grid_follows_rows_then_columns():
    """Rows and columns must not swap: the formula written out on a 2 × 3 grid."""
    table = sincos_position_table(2, 3, 8, temperature=100.0)
    for r in range(2):
        for c in range(3):
            omegas = [100.0 ** (-k / 2) for k in range(2)]
            row = [math.sin(r * w) for w in omegas] + [math.cos(r * w) for w in omegas]
            col = [math.sin(c * w) for w in omegas] + [math.cos(c * w) for w in omegas]
            torch.testing.assert_close(table[r * 3 + c].double(), torch.tensor(row + col, dtype=torch.float64),
                                       atol=1e-6, rtol=1e-5)


def official_cosine_momentum(base: float, t: int, total: int) -> float:
    """moco-v3 main_moco.py:431-434 and byol utils/schedules.py:20-24, at iteration t of `total`."""
    return 1 - (1 - base) * 0.5 * (1 + math.cos(math.pi * t / total))


def _record_steps(monkeypatch, cls: type, log: list[dict]) -> None:
    """At every forward, the student weights and the teacher weights the targets are computed with."""
    original = cls.training_step

    def recording(self, batch, step):
        pairs = self.ema_pairs()
        log.append({"step": step, "total": self.run.total_steps,
                    "student": [p.detach().clone().double() for s, _ in pairs for p in s.parameters()],
                    "teacher": [p.detach().clone().double() for _, t in pairs for p in t.parameters()]})
        return original(self, batch, step)

    monkeypatch.setattr(cls, "training_step", recording)


# The teacher the official code computes its targets with at step t, from the teacher of step
# t − 1 and the student at the start of step t: MoCo v3 moves it with m(t) before its keys
# (builder.py:89-90); BYOL moved it with τ(t − 1) right after the optimizer step t − 1
# (byol_experiment.py:335-343). `lag` is the index shift from t.
OFFICIAL_LAG = {"mocov3": 0, "byol": 1}


@pytest.mark.parametrize("method,cls", [("mocov3", MoCoV3), ("byol", BYOL)])
def test_teacher_follows_the_official_momentum_index_through_the_trainer(tmp_path: Path, monkeypatch, method: str,
                                                                         cls: type):
    """Three steps of the real trainer with a schedule of four (m0 = 0.5, so one step of index
    moves the momentum by 0.07): every teacher equals the official recursion computed here from
    the recorded weights, and the recursion one index off is far from it (the check can fail)."""
    log: list[dict] = []
    _record_steps(monkeypatch, cls, log)
    recipe = yaml.safe_load((REPO / "recipes" / "quickstart" / f"{method}.yaml").read_text())
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    config = recipes.load(tmp_path / "recipe.yaml", [
        *SMALL, "method.predictor_hidden_dim=16", "method.momentum=0.5", "data.samples_per_epoch=64",
        "optim.epochs=2", "optim.max_steps=3", "optim.warmup_epochs=0", "optim.base_lr=2.0", "data.workers=0",
        "log.tensorboard=false", "log.progress=false", "eval.knn_baseline=false", "eval.knn_at_end=false",
        f"log.dir={tmp_path / 'run'}"])
    train(config)
    assert [entry["step"] for entry in log] == [0, 1, 2] and log[0]["total"] == 4
    for teacher, student in zip(log[0]["teacher"], log[0]["student"], strict=True):
        torch.testing.assert_close(teacher, student)  # both networks start from the same weights
    lag = OFFICIAL_LAG[method]
    for t in (1, 2):
        before, now = log[t - 1], log[t]
        for got, want in zip(now["teacher"], _official_teacher(before, now, t - lag), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        one_off = _official_teacher(before, now, t - 1 + lag)
        gap = max((a - b).abs().max().item() for a, b in zip(now["teacher"], one_off, strict=True))
        assert gap > 1e-4, f"step {t}: the index one off gives the same teacher (gap {gap:.2e}): the check is void"


def _official_teacher(before: dict, now: dict, index: int) -> list[torch.Tensor]:
    """m·teacher + (1 − m)·student with m the cosine momentum (m0 = 0.5) at `index`."""
    m = official_cosine_momentum(0.5, index, now["total"])
    return [m * k + (1 - m) * q for k, q in zip(before["teacher"], now["student"], strict=True)]


# Each policy's crop interpolation in its official code (policies.py names the lines).
OFFICIAL_INTERPOLATION = {"instdisc": "bilinear", "mocov2": "bilinear", "simclr": "bicubic", "byol": "bicubic",
                          "mocov3": "bilinear", "swav": "bilinear", "dino": "bicubic", "cmc": "bilinear",
                          "cpc": "bilinear", "clip": "bicubic"}


@pytest.mark.parametrize("policy", sorted(OFFICIAL_INTERPOLATION))
def test_each_policy_resizes_its_crops_as_its_official_code(policy: str):
    """The resolved policy says the official mode, and Geometry's crops are resized with it: a
    crop equals the same box resized in that mode and differs from the other mode's."""
    assert set(POLICIES) == set(OFFICIAL_INTERPOLATION)
    views = recipes.load(None, [f"data.views.policy={policy}"]).data.views
    mode = OFFICIAL_INTERPOLATION[policy]
    assert views.interpolation == mode
    if policy in ("cpc", "clip"):  # resize, then a crop of it: no random-resized crop to compare
        return
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    views.size, views.views, views.local_crops, views.flip_prob = 40, 1, 0, 0.0
    views.crop_scale = [0.1, 0.1]  # a small crop, upscaled: bilinear and bicubic then differ
    crop = Geometry(views)(image, random.Random(1))[0][0]
    box = geo.random_resized_crop_box(60, 80, (0.1, 0.1), tuple(views.crop_ratio), random.Random(1))
    assert torch.equal(crop, geo.crop_resize(geo.as_batch(image), box, 40, mode))
    other = {"bilinear": "bicubic", "bicubic": "bilinear"}[mode]
    assert not torch.equal(crop, geo.crop_resize(geo.as_batch(image), box, 40, other))


def test_mocov3_policy_is_byols_views_resized_bilinearly():
    """main_moco.py:262-285 follows BYOL's recipe in all but the resize mode."""
    byol = recipes.load(None, ["data.views.policy=byol"]).data.views
    mocov3 = recipes.load(None, ["data.views.policy=mocov3"]).data.views
    differing = {k for k in vars(byol) if k != "policy" and getattr(byol, k) != getattr(mocov3, k)}
    assert differing == {"interpolation"}
    assert recipes.load(IMAGENET / "mocov3_vit_small.yaml", []).data.views.policy == "mocov3"


# Whether the official ResNet zero-inits the last BN γ of each residual block (the recipes name
# the lines): torchvision's default, zero_init_residual=False, in MoCo v1/v2, InstDisc and CMC's
# own ResNets, SwAV's; True in SimSiam, Barlow Twins, VICReg, haiku's (BYOL) and SimCLR's TF ResNet.
OFFICIAL_ZERO_INIT_LAST = {"mocov1": False, "mocov2": False, "instdisc": False, "cmc": False, "swav": False,
                           "simsiam": True, "barlow": True, "byol": True, "simclr": True, "simclrv2": True,
                           "vicreg": True}


@pytest.mark.parametrize("recipe", sorted(OFFICIAL_ZERO_INIT_LAST))
def test_imagenet_resnet_recipes_init_the_last_bn_of_each_block_as_the_official_code(recipe: str):
    model = recipes.load(IMAGENET / f"{recipe}_resnet50.yaml", []).model
    model.backbone_args = {**model.backbone_args, "channels": [8, 8, 8, 8]}  # the same init rule, smaller
    backbone = build_backbone(model)
    last = [block.bn3.weight for block in backbone.modules() if hasattr(block, "bn3")]
    assert len(last) == 16  # ResNet-50: 3 + 4 + 6 + 3 bottlenecks
    expected = 0.0 if OFFICIAL_ZERO_INIT_LAST[recipe] else 1.0
    assert all(torch.equal(w.detach(), torch.full_like(w, expected)) for w in last)


@pytest.mark.parametrize("batch", [256, 2048, 4096])
def test_barlow_lr_schedule_equals_the_official_one_at_any_batch(batch: int):
    """barlowtwins main.py:155-168 written out: base = batch/256; warm-up over 10 epochs, then
    a cosine from base to 0.001·base; weights × 0.2, biases and BN × 0.0048 — every step."""
    optim = recipes.load(IMAGENET / "barlow_resnet50.yaml", [f"optim.batch_size={batch}"]).optim
    steps_per_epoch = 3
    schedule = lr_schedule(optim, steps_per_epoch, optim.epochs * steps_per_epoch)
    max_steps, warmup_steps, base = optim.epochs * steps_per_epoch, 10 * steps_per_epoch, batch / 256
    for step in range(max_steps):
        official = fair_warmup_cosine(step, base, warmup_steps, max_steps)
        assert schedule(step) == pytest.approx(official * 0.2, rel=1e-9, abs=1e-15), step
        assert schedule(step) * optim.no_decay_lr_scale == pytest.approx(official * 0.0048, rel=1e-9, abs=1e-15)
    assert optim.min_lr == pytest.approx(0.001 * 0.2 * batch / 256)


@pytest.mark.parametrize("recipe,base_lr,batch", [("mocov2", 0.03, 256), ("simsiam", 0.05, 512)])
def test_per_epoch_cosines_equal_the_official_ones(recipe: str, base_lr: float, batch: int):
    """moco main_moco.py:372-376 and simsiam main_simsiam.py:359-366: lr × ½(1 + cos(π·epoch /
    epochs)), set once at the start of each epoch; checked at every step of a whole run."""
    optim = recipes.load(IMAGENET / f"{recipe}_resnet50.yaml", []).optim
    assert optim.batch_size == batch
    steps_per_epoch = 5
    schedule = lr_schedule(optim, steps_per_epoch, optim.epochs * steps_per_epoch)
    init_lr = base_lr * batch / 256
    for step in range(optim.epochs * steps_per_epoch):
        epoch = step // steps_per_epoch
        official = init_lr * 0.5 * (1 + math.cos(math.pi * epoch / optim.epochs))
        assert schedule(step) == pytest.approx(official, rel=1e-9, abs=1e-15), step


def test_lr_per_epoch_holds_each_epochs_first_value_of_any_schedule():
    """Warm-up included: each step gets the per-step schedule's value at its epoch's first step."""
    per_step = recipes.load(None, ["optim.lr=1.0", "optim.warmup_epochs=2", "optim.min_lr=0.1"]).optim
    per_epoch = recipes.load(None, ["optim.lr=1.0", "optim.warmup_epochs=2", "optim.min_lr=0.1",
                                       "optim.lr_per_epoch=true"]).optim
    smooth, stepped = lr_schedule(per_step, 4, 40), lr_schedule(per_epoch, 4, 40)
    assert [stepped(s) for s in range(40)] == [smooth(4 * (s // 4)) for s in range(40)]
    assert stepped(5) != smooth(5)
