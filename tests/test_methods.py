"""Each method plugs into the engine and trains a step; its schedules hit their start and end
values; its method-specific mechanics (stop-gradients, frozen parts, centres, codes) hold."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from engine_cases import BATCH, make_config, setup
from helpers import QUICKSTART, SMALL

from bigssl import recipes
from bigssl.methods.dino import DINO
from bigssl.optim import GroupSettings, ParamRule
from bigssl.train import train

MULTI_CROP = {"swav": ["method.prototypes=24"], "dino": ["method.out_dim=64", "method.hidden_dim=32",
                                                          "method.bottleneck_dim=16"]}
EXTRA = {"mocov3": ["method.predictor_hidden_dim=32"], "byol": ["method.predictor_hidden_dim=32"],
         "simsiam": ["method.predictor_hidden_dim=8"], "barlow": [], "vicreg": []}


def batch_for(method: str, step: int = 0) -> dict:
    generator = torch.Generator().manual_seed(step)
    groups = [torch.rand((2, BATCH, 3, 32, 32), generator=generator)]
    if method in MULTI_CROP:
        groups.append(torch.rand((3, BATCH, 3, 16, 16), generator=generator))
    return {"views": groups, "label": torch.arange(BATCH) % 3}


def engine_for(method: str, *extra: str, steps_per_epoch: int = 1, total_steps: int = 1):
    keys = [*MULTI_CROP.get(method, EXTRA.get(method, [])), "model.backbone_args.dynamic_img_size=true", *extra]
    return setup(make_config(method, *keys), 0, 1, steps_per_epoch=steps_per_epoch, total_steps=total_steps)


@pytest.mark.parametrize("method", ["byol", "simsiam", "barlow", "mocov3", "swav", "dino", "vicreg"])
def test_method_trains_a_step_and_reports_its_numbers(method: str):
    """Through the engine: forward, backward, one step. The step is TINY_VIT's SGD written out on
    the gradients the method's loss gave (global norm clipped to 1; momentum's first step is the
    update itself): w ← w − 0.05·(c·g + 0.05·w), without the decay for biases and norms. The loss
    values are test_method_loss_is_its_formula_on_recomputed_embeddings's."""
    engine = engine_for(method)
    before = {n: p.detach().clone() for n, p in engine.method.backbone.named_parameters() if p.requires_grad}
    out = engine.forward(batch_for(method), 0)
    assert out.loss.ndim == 0
    assert out.features.shape[0] == BATCH and out.embedding.shape[0] == BATCH
    engine.backward(out.loss)
    grads = {n: p.grad.detach().clone() for n, p in engine.method.named_parameters() if p.grad is not None}
    norm = engine.step()
    total = math.sqrt(sum(g.double().pow(2).sum().item() for g in grads.values()))
    assert norm == pytest.approx(total, rel=1e-5)
    clip = min(1.0, 1.0 / (total + 1e-6))
    lr, weight_decay = 0.05, 0.05  # TINY_VIT's optim.lr and optim.weight_decay
    assert before and all(f"backbone.{n}" in grads for n in before)
    for name, param in engine.method.backbone.named_parameters():
        if name in before:
            decay = weight_decay if param.ndim > 1 else 0.0
            expected = before[name] - lr * (clip * grads[f"backbone.{name}"] + decay * before[name])
            torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-7)
    if method in ("swav", "dino"):
        outputs = {"swav": 24, "dino": 64}[method]  # method.prototypes / method.out_dim above
        assert out.uniform_loss.item() == pytest.approx(math.log(outputs))


def _cosine_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(1).div(a.norm(dim=1) * b.norm(dim=1)).mean()


def _info_nce_written_out(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """Cross-entropy of cos(q_i, k_j)/τ with the positive on the diagonal."""
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / tau
    return (torch.logsumexp(logits, dim=1) - logits.diag()).mean()


def _entropy_and_kl(p: torch.Tensor, student_logits: torch.Tensor) -> tuple[float, float]:
    """Mean over rows of −Σ p log p and of Σ p (log p − log softmax(s))."""
    log_q = student_logits - student_logits.logsumexp(dim=1, keepdim=True)
    log_p = p.clamp(min=1e-12).log()
    return (-(p * log_p).sum(1).mean().item(), (p * (log_p - log_q)).sum(1).mean().item())


def _swav_written_out(model, groups: list[torch.Tensor]) -> dict[str, float]:
    """main_swav.py: z = unit(projector(h)), scores = z·Pᵀ; per global crop i, codes q_i = B·Q of
    Sinkhorn-Knopp on exp(scores_i/ε) (rows to 1/K, columns to 1/B, 3 times); loss = mean over i
    of the mean over the other crops v of −Σ q_i log softmax(scores_v/τ)."""
    m = model.config
    crops = [g[v] for g in groups for v in range(g.shape[0])]
    z = [F.normalize(model.projector(model.backbone(c)), dim=1).double() for c in crops]
    scores = [x @ model.prototypes.weight.double().T for x in z]
    codes = []
    for i in range(2):
        q = torch.exp(scores[i] / m.epsilon).T
        q /= q.sum()
        for _ in range(m.sinkhorn_iterations):
            q /= q.sum(dim=1, keepdim=True) * q.shape[0]
            q /= q.sum(dim=0, keepdim=True) * q.shape[1]
        codes.append((q * q.shape[1]).T)
    loss = 0.0
    for i in range(2):
        others = [v for v in range(len(crops)) if v != i]
        loss += sum(-(codes[i] * F.log_softmax(scores[v] / m.temperature, dim=1)).sum(1).mean() for v in others) / len(
            others)
    entropy, kl = _entropy_and_kl(codes[0], scores[1] / m.temperature)
    return {"loss": loss.item() / 2, "teacher_entropy": entropy, "teacher_student_kl": kl}


def _dino_written_out(model, groups: list[torch.Tensor]) -> dict[str, float]:
    """main_dino.py DINOLoss at step 0 (centre 0, teacher temperature 0.04): the mean over pairs
    (teacher global crop i, student crop v ≠ i) of −Σ softmax((t_i − c)/τ_t) log softmax(s_v/τ_s)."""
    m = model.config
    crops = [g[v] for g in groups for v in range(g.shape[0])]
    student = [model.head(model.backbone(c)).double() / m.student_temp for c in crops]
    center = model.center.double()
    teacher = [torch.softmax((model.teacher_head(model.teacher_backbone(c)).double() - center) / m.teacher_temp, dim=1)
               for c in crops[:2]]
    pairs = [(i, v) for i in range(2) for v in range(len(crops)) if v != i]
    loss = sum(-(teacher[i] * F.log_softmax(student[v], dim=1)).sum(1).mean() for i, v in pairs) / len(pairs)
    entropy, kl = _entropy_and_kl(teacher[0], student[1])
    return {"loss": loss.item(), "teacher_entropy": entropy, "teacher_student_kl": kl}


@pytest.mark.parametrize("method", ["byol", "simsiam", "barlow", "mocov3", "swav", "dino"])
def test_method_loss_is_its_formula_on_recomputed_embeddings(method: str):
    """The loss a method returns equals its paper's formula on embeddings recomputed here from
    its own modules (eval mode: BN fixed, so both computations see the same network); SwAV's and
    DINO's entropy of the codes / teacher and KL to the student's second crop likewise."""
    engine = engine_for(method)
    model = engine.method.eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a teacher apart from its student (equal at init), so neither can stand in for the other
        for _, teacher in model.ema_pairs():
            for param in teacher.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    if method in ("swav", "dino"):
        groups = batch_for(method)["views"]  # 2 global crops of 32 px, 3 local of 16 px
        assert method == "swav" or not model.center.any()  # DINO's centre starts at 0
        with torch.no_grad():
            expected = (_swav_written_out if method == "swav" else _dino_written_out)(model, groups)
            out = model({"views": groups, "label": torch.zeros(BATCH, dtype=torch.long)}, 0)
        assert out.loss.item() == pytest.approx(expected["loss"], rel=1e-5)
        for name in ("teacher_entropy", "teacher_student_kl"):
            assert out.metrics[name].item() == pytest.approx(expected[name], rel=1e-4, abs=1e-6)
        return
    views = batch_for(method)["views"][0]
    with torch.no_grad():
        out = model({"views": [views], "label": torch.zeros(BATCH, dtype=torch.long)}, 0)
        h = [model.backbone(views[v]) for v in range(2)]
        if method == "byol":  # 2 − 2·cos(prediction, target of the other view), both ways
            p = [model.predictor(model.projector(x)) for x in h]
            t = [model.target_projector(model.target_backbone(views[v])) for v in range(2)]
            expected = (2 - 2 * _cosine_mean(p[0], t[1])) + (2 - 2 * _cosine_mean(p[1], t[0]))
        elif method == "simsiam":  # −½ [cos(p1, z2) + cos(p2, z1)]
            z = [model.projector(x) for x in h]
            p = [model.predictor(x) for x in z]
            expected = -0.5 * (_cosine_mean(p[0], z[1]) + _cosine_mean(p[1], z[0]))
        elif method == "barlow":
            # Official main.py: c = bn(z1)ᵀ bn(z2) / N (BatchNorm1d without affine, training
            # statistics); Σ (1 − c_ii)² + λ Σ_{i≠j} c_ij².
            z = [F.batch_norm(model.projector(x), None, None, training=True) for x in h]
            c = z[0].T @ z[1] / BATCH
            off = c - torch.diag(torch.diagonal(c))
            expected = (torch.diagonal(c) - 1).pow(2).sum() + model.config.lambd * off.pow(2).sum()
        else:  # MoCo v3: 2τ [ctr(q1, k2) + ctr(q2, k1)]
            tau = model.config.temperature
            q = [model.predictor(model.projector(x)) for x in h]
            k = [model.momentum_projector(model.momentum_backbone(views[v])) for v in range(2)]
            expected = 2 * tau * (_info_nce_written_out(q[0], k[1], tau) + _info_nce_written_out(q[1], k[0], tau))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("views", [2, 3])
def test_simclr_loss_is_nt_xent_of_its_projections_over_all_views(views: int):
    """Two views: NT-Xent; more (and local crops): every other view of an image is a positive.
    Recomputed here from the backbone and projector on the same views, in eval mode (fixed BN)."""
    from bigssl import losses
    from bigssl.methods.base import flat

    engine = engine_for("simclr", "model.backbone_args.dynamic_img_size=true")
    method = engine.method.eval()
    generator = torch.Generator().manual_seed(views)
    groups = [torch.rand((views, BATCH, 3, 32, 32), generator=generator),
              torch.rand((2, BATCH, 3, 16, 16), generator=generator)][: 1 if views == 2 else 2]
    with torch.no_grad():
        out = method({"views": groups, "label": torch.zeros(BATCH, dtype=torch.long)}, 0)
        projections = [z for g in groups for z in method.projector(method.backbone(flat(g))).chunk(g.shape[0])]
    assert len(projections) == (2 if views == 2 else views + 2)
    tau = method.config.temperature
    expected = (losses.nt_xent(*projections, tau) if views == 2 else losses.multiview_nt_xent(projections, tau))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not out.features.requires_grad and out.features.shape[0] == BATCH  # only the loss carries grad


@pytest.mark.parametrize("method,start,shift", [("byol", 0.996, 0), ("mocov3", 0.99, 1), ("dino", 0.996, 0)])
def test_ema_momentum_runs_cosine_from_its_base_to_one(method: str, start: float, shift: int):
    """m(t) = 1 − (1 − m0)·½(1 + cos(π t / T)), applied after optimizer step s with t = s + shift:
    MoCo v3's official update at the start of step s + 1 uses m(s + 1)."""
    engine = engine_for(method, steps_per_epoch=10, total_steps=100)
    momentum = engine.method.ema_momentum
    for step in (0, 37, 50 - shift, 100 - shift):
        t = step + shift
        assert momentum(step) == pytest.approx(1 - (1 - start) * 0.5 * (1 + math.cos(math.pi * t / 100)), rel=1e-12)
    assert momentum(50 - shift) == pytest.approx((start + 1) / 2) and momentum(100 - shift) == pytest.approx(1.0)


def test_dino_schedules_hit_their_start_and_end_values():
    engine = engine_for("dino", "optim.weight_decay=0.04", steps_per_epoch=10, total_steps=1000)
    method: DINO = engine.method
    # The official per-epoch schedule: np.linspace(0.04, 0.07, 30)[epoch], then 0.07.
    official = np.concatenate([np.linspace(0.04, 0.07, 30), np.full(70, 0.07)])
    for step in (0, 9, 10, 150, 289, 290, 299, 300, 999):
        assert method.teacher_temperature(step) == pytest.approx(official[step // 10], rel=1e-12)
    assert method.teacher_temperature(9) == method.teacher_temperature(0)  # constant within an epoch
    assert method.weight_decay_at(0) == pytest.approx(0.04) and method.weight_decay_at(1000) == pytest.approx(0.4)
    assert method.param_rules() == [ParamRule("head.last_layer.", frozen_steps=10)]


def test_dino_centre_is_the_momentum_mean_of_teacher_outputs():
    engine = engine_for("dino")
    method = engine.method
    batch = batch_for("dino")
    with torch.no_grad():
        teacher = method.teacher_head(method.teacher_backbone(batch["views"][0].flatten(0, 1)))
    method(batch, 0)
    torch.testing.assert_close(method.center, 0.1 * teacher.mean(dim=0, keepdim=True), atol=1e-6, rtol=1e-5)


def test_simsiam_stops_the_gradient_at_the_target_projection():
    engine = engine_for("simsiam")
    method = engine.method
    batch = batch_for("simsiam")
    views = batch["views"][0]
    z = [method.projector(method.backbone(views[v])) for v in range(2)]
    p = [method.predictor(x) for x in z]
    loss = 0.5 * (-torch.nn.functional.cosine_similarity(p[0], z[1].detach()).mean()
                  - torch.nn.functional.cosine_similarity(p[1], z[0].detach()).mean())
    expected = torch.autograd.grad(loss, list(method.projector.parameters()))
    got = torch.autograd.grad(method(batch, 0).loss, list(method.projector.parameters()))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert engine.optimizer.param_groups[-1]["name"].startswith("predictor")
    assert all(GroupSettings.of(g).fixed_lr for g in engine.optimizer.param_groups if g["name"].startswith("predictor"))


def test_mocov3_vit_has_a_frozen_random_patch_projection_and_sincos_positions():
    """The position table is vits.py's formula, written out here: for the patch in row r, column
    c, the quarters sin(r·ω_k), cos(r·ω_k), sin(c·ω_k), cos(c·ω_k), ω_k = 10000^(−k/(D/4)); the
    class token's position is zero; nothing of it is learned."""
    method = engine_for("mocov3").method
    assert not method.backbone.patch_embed.proj.weight.requires_grad
    assert not method.backbone.pos_embed.requires_grad
    rows, cols = method.backbone.patch_embed.grid_size
    dim = method.backbone.pos_embed.shape[-1]
    quarter = dim // 4
    expected = torch.zeros(1 + rows * cols, dim, dtype=torch.float64)
    for r in range(rows):
        for c in range(cols):
            for k in range(quarter):
                omega = 10000.0 ** (-k / quarter)
                expected[1 + r * cols + c, [k, quarter + k, 2 * quarter + k, 3 * quarter + k]] = torch.tensor(
                    [math.sin(r * omega), math.cos(r * omega), math.sin(c * omega), math.cos(c * omega)],
                    dtype=torch.float64)
    torch.testing.assert_close(method.backbone.pos_embed[0].double(), expected, atol=1e-6, rtol=1e-5)
    assert all(not p.requires_grad for p in method.momentum_backbone.parameters())


def test_swav_codes_are_distributions_and_prototypes_start_frozen():
    engine = engine_for("swav", steps_per_epoch=7, total_steps=70)
    method = engine.method
    assert method.param_rules() == [ParamRule("prototypes.", frozen_steps=7)]
    method.config.freeze_prototypes_steps = 313  # the official count, in iterations
    assert method.param_rules() == [ParamRule("prototypes.", frozen_steps=313)]
    scores = torch.randn(BATCH, 24, generator=torch.Generator().manual_seed(0))
    codes = method._codes(scores, torch.randn(BATCH, 16), 0, 0)
    # The official Sinkhorn-Knopp (main_swav.py distributed_sinkhorn), written out in plain
    # exponentials: Q = exp(scores/ε)ᵀ / total; per iteration rows (prototypes) to 1/K, columns
    # (samples) to 1/B; codes = B·Q, transposed.
    epsilon, iterations = method.config.epsilon, method.config.sinkhorn_iterations
    q = torch.exp(scores.double() / epsilon).T
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True) * 24
        q /= q.sum(dim=0, keepdim=True) * BATCH
    torch.testing.assert_close(codes.double(), (q * BATCH).T, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(BATCH), rtol=1e-5, atol=1e-6)


def test_trainer_applies_frozen_groups_fixed_lr_and_the_weight_decay_schedule(tmp_path: Path):
    """DINO through the real trainer (multi-crop views, 2 steps per epoch): the last layer's lr is
    0 during the first epoch, weight decay follows DINO's cosine, every number is logged."""
    run = tmp_path / "run"
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["method"] = {"name": "dino", "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}
    (tmp_path / "dino.yaml").write_text(yaml.safe_dump(recipe))
    config = recipes.load(tmp_path / "dino.yaml", [*SMALL, "data.views.policy=dino",
                                          "data.views.local_crops=2", "data.samples_per_epoch=64",
                                          "optim.epochs=2", "optim.weight_decay=0.04", "log.tensorboard=false",
                                          "log.progress=false", "eval.knn_baseline=false", f"log.dir={run}",
                                          "eval.knn_at_end=false", "data.workers=0"])
    train(config)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    frozen = [r["lr/head.last_layer:decay"] for r in steps]  # the lr set for step 0, 1, 2, 3
    assert frozen[0] == frozen[1] == 0 and frozen[2] > 0
    assert [r["wd/decay"] for r in steps] == pytest.approx(
        [0.4 - 0.36 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])
    for record in steps:
        assert {"teacher_temp", "teacher_entropy", "teacher_student_kl", "uniform_loss", "ema_momentum"} <= set(record)
        assert record["uniform_loss"] == pytest.approx(math.log(64))


RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*/*.yaml"))


def resnet_trunk_parameters(depth: int, widths: tuple[int, ...] = (64, 128, 256, 512), in_chans: int = 3,
                            stem: int = 7) -> int:
    """A ResNet without its classifier, counted layer by layer: a stem×stem convolution to 64
    channels and its norm (2 per channel, BN or GroupNorm alike); per stage, blocks of two 3×3
    convolutions (ResNet-18) or 1×1, 3×3, 1×1 ×4 (ResNet-50), each with its norm, and a 1×1
    projection with its norm on a block that changes stride or width."""
    blocks = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}[depth]
    expansion = 1 if depth == 18 else 4
    total, inplanes = stem * stem * in_chans * 64 + 2 * 64, 64
    for stage, (count, width) in enumerate(zip(blocks, widths, strict=True)):
        out = width * expansion
        for block in range(count):
            convs = ([(inplanes, width, 3), (width, width, 3)] if expansion == 1 else
                     [(inplanes, width, 1), (width, width, 3), (width, out, 1)])
            total += sum(i * o * k * k + 2 * o for i, o, k in convs)
            if (stage > 0 and block == 0) or inplanes != out:
                total += inplanes * out + 2 * out
            inplanes = out
    return total


def vit_trunk_parameters(dim: int, depth: int, patch: int = 16, image: int = 224, mlp: int = 4) -> int:
    """A ViT without its head: the patch projection (with bias), class token, position table of
    every patch and the class token; per block two LayerNorms, qkv and output projections, the
    MLP (all with biases); the final LayerNorm."""
    block = 2 * 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (mlp * dim * dim + mlp * dim) + (
        mlp * dim * dim + dim)
    return patch * patch * 3 * dim + dim + dim + ((image // patch) ** 2 + 1) * dim + depth * block + 2 * dim


# The published trunks (no classifier): torchvision's ResNet-50, 25,557,032 parameters less its
# 2048 → 1000 fc; DeiT-S / ViT-S/16, 22,050,664 less its 384 → 1000 head; OpenAI CLIP's RN50
# image tower, 38,316,896 less its attention pool's 2048 → 1024 output projection (the embedding
# projection bigssl's CLIP adds itself).
PUBLISHED = {"resnet50": 25_557_032 - 2_049_000, "vit_small_patch16_224": 22_050_664 - 385_000,
             "resnet50_clip": 38_316_896 - 2_098_176}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_recipe_resolves_and_builds_its_method(recipe: Path):
    """Every recipe's trunk has the parameters its architecture counts to (CMC: an encoder for L
    and one for ab), and the standard ImageNet trunks their published counts."""
    from bigssl.methods import build

    config = recipes.load(recipe, [])
    assert config.method.name in recipe.stem
    method = build(config)
    count = sum(p.numel() for p in method.backbone.parameters())
    model, args = config.model, config.model.backbone_args
    if model.backbone in ("resnet18", "resnet50"):
        widths = tuple(args.get("channels", (64, 128, 256, 512)))
        parts = (1, 2) if config.method.name == "cmc" else (3,)
        expected = sum(resnet_trunk_parameters(int(model.backbone[6:]), widths, channels, 3 if model.small_stem else 7)
                       for channels in parts)
    elif model.backbone == "vit_small_patch16_224":
        expected = vit_trunk_parameters(384, 12)
    else:
        expected = PUBLISHED[model.backbone]
    assert count == expected
    standard = model.backbone in PUBLISHED and "channels" not in args
    if recipe.parent.name == "imagenet" and standard:
        assert count == PUBLISHED[model.backbone]
    if recipe.parent.name == "imagenet":
        assert "Target:" in recipe.read_text() and "Sources:" in recipe.read_text()


def _dino_centre_worker(rank: int, world_size: int, out: Path) -> None:
    from bigssl.distributed import comm

    assert comm.world_size() == world_size == 2
    method = engine_for("dino").method
    full = batch_for("dino")
    half = {"views": [g[:, rank * BATCH // 2 : (rank + 1) * BATCH // 2] for g in full["views"]],
            "label": full["label"][rank * BATCH // 2 : (rank + 1) * BATCH // 2]}
    method(half, 0)
    torch.save(method.center.clone(), out / f"rank{rank}.pt")


@pytest.mark.distributed
def test_dino_centre_on_two_ranks_equals_one_process(tmp_path: Path):
    from helpers import run_distributed

    run_distributed(_dino_centre_worker, 2, tmp_path)
    method = engine_for("dino").method
    method(batch_for("dino"), 0)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True), method.center,
                                   atol=1e-7, rtol=1e-5)
