"""What a run shows while it trains: health metrics and their collapse warnings, the online
probe, TensorBoard scalars, view grid, ViT attention maps and projector dump, and a backbone
folder that timm loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
import yaml
from engine_cases import make_config, rank_batch, setup
from helpers import QUICKSTART, SMALL, run_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bigssl import health
from bigssl.eval import attention, offline

VIT_ARGS = {"img_size": 28, "patch_size": 7, "embed_dim": 32, "depth": 2, "num_heads": 2}
SMALL_HEADS = [o for o in SMALL if not o.startswith("model.backbone_args")]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory) -> Path:
    """The quickstart recipe with a tiny ViT in place of its ResNet (a recipe file: overrides
    merge into backbone_args, they cannot drop the ResNet's `channels`)."""
    root = tmp_path_factory.mktemp("monitor")
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["model"].update(backbone="vit_tiny_patch16_224", small_stem=False, pool_grid=1, backbone_args=VIT_ARGS)
    (root / "vit.yaml").write_text(yaml.safe_dump(recipe))
    run = root / "run"
    result = run_cli("train", str(root / "vit.yaml"), *SMALL_HEADS, f"log.dir={run}", "optim.max_steps=4",
                     "eval.knn_baseline=false", "eval.knn_pixels=false", "eval.online_probe_classes=10",
                     "eval.projector_samples=64")
    assert result.returncode == 0, result.stderr
    return run


def test_every_log_step_records_the_health_of_the_run(vit_run: Path):
    records = [json.loads(line) for line in (vit_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    peak_lr = yaml.safe_load((vit_run / "config.yaml").read_text())["optim"]["lr"]
    expected = {"loss", "lr", "grad_norm", "health/embedding_std", "health/rankme", "health/embedding_std_floor",
                "lr/decay", "wd/decay", "lr/no_decay", "wd/no_decay", "lr/online_probe", "wd/online_probe",
                "probe/loss", "probe/top1", "temperature", "images_per_s", "data_wait_fraction", "memory/rss_gib"}
    # The values of the health numbers, the probe's and the loss, recomputed from each step's tensors:
    # test_logged_health_probe_and_loss_are_those_of_the_step_recomputed; the lr of every group at
    # every step of a whole run: test_optim.py::test_a_whole_run_steps_with_the_scheduled_lr_at_every_step.
    for record in steps:
        assert expected <= record.keys(), expected - record.keys()
        dim = 16  # SMALL's projector.out_dim
        assert record["health/embedding_std_floor"] == pytest.approx(0.2 / math.sqrt(dim))
        assert record["temperature"] == pytest.approx(0.2)
        assert record["wd/no_decay"] == 0 and record["wd/online_probe"] == 0
        # The probe follows the backbone's schedule, scaled to peak at eval.online_probe_lr = 0.1.
        assert record["lr/online_probe"] == pytest.approx(record["lr/decay"] * 0.1 / peak_lr)
        # Timings and memory: measured, nothing to recompute them from; their ranges only.
        assert 0 <= record["data_wait_fraction"] <= 1 and record["memory/rss_gib"] > 0.1


def test_logged_health_probe_and_loss_are_those_of_the_step_recomputed(tmp_path: Path, monkeypatch):
    """One process, the real trainer, a log record at every step: each step's embedding, features,
    labels and probe weights are recorded as the method sees them, and the logged numbers are
    recomputed from them with the math written out here: the std of the L2-normalised embedding
    (unbiased, averaged over dimensions), RankMe (exp of the entropy of σ/Σσ + 1e-7), the probe's
    cross-entropy and top-1 on the labelled samples, and the method's own loss (the probe's
    cross-entropy is trained alongside but not logged in it)."""
    from bigssl import recipes
    from bigssl.methods.base import Method
    from bigssl.train import train

    seen: list[dict] = []
    original = Method.forward

    def recording(self, batch, step):
        probe = (self.online_probe.weight.detach().clone().double(), self.online_probe.bias.detach().clone().double())
        out = original(self, batch, step)
        seen.append({"probe": probe, "label": batch["label"].clone(),
                     **{k: getattr(out, k).detach().clone().double()
                        for k in ("embedding", "features", "loss", "ssl_loss")}})
        return out

    monkeypatch.setattr(Method, "forward", recording)
    run = tmp_path / "run"
    train(recipes.load(QUICKSTART, [
        *SMALL, "model.backbone_args.channels=[4,4,4,4]", "data.views.size=8", "data.views.resize=8",
        "optim.max_steps=3", "data.workers=0", "eval.online_probe_classes=10", "eval.knn_baseline=false",
        "eval.knn_at_end=false", "eval.knn_pixels=false", "log.tensorboard=false", "log.progress=false",
        f"log.dir={run}"]))
    records = [r for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in (r := json.loads(line))]
    assert [r["step"] for r in records] == [1, 2, 3] and len(seen) == 3
    for record, step in zip(records, seen, strict=True):
        z = step["embedding"]
        assert z.shape == (32, 16)  # the global batch × SMALL's projector.out_dim
        unit = z / z.pow(2).sum(dim=1, keepdim=True).sqrt()
        std = ((unit - unit.mean(dim=0)).pow(2).sum(dim=0) / (len(z) - 1)).sqrt().mean().item()
        assert record["health/embedding_std"] == pytest.approx(std, rel=1e-5)
        sigma = torch.linalg.svdvals(z)
        p = sigma / sigma.sum() + 1e-7
        assert record["health/rankme"] == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-4)
        weight, bias = step["probe"]
        logits = step["features"] @ weight.T + bias
        labels = step["label"]
        labelled = labels >= 0
        assert labelled.all()  # the quickstart data is labelled
        cross_entropy = (logits.logsumexp(dim=1) - logits[torch.arange(len(labels)), labels]).mean().item()
        assert record["probe/loss"] == pytest.approx(cross_entropy, rel=1e-5)
        assert record["probe/top1"] == pytest.approx((logits.argmax(dim=1) == labels).double().mean().item(),
                                                     rel=1e-6)
        assert record["loss"] == pytest.approx(step["ssl_loss"].item(), rel=1e-6)
        assert step["loss"].item() == pytest.approx(step["ssl_loss"].item() + cross_entropy, rel=1e-5)


def test_tensorboard_holds_every_scalar_and_image(vit_run: Path):
    events = EventAccumulator(str(vit_run / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "health/embedding_std", "health/rankme", "lr/decay",
                "wd/decay", "lr/online_probe", "probe/top1", "probe/loss", "train/temperature",
                "train/images_per_s", "train/data_wait_fraction", "memory/rss_gib", "knn/top1", "knn/top5"):
        assert tag in scalars, tag
    assert [e.step for e in events.Scalars("health/rankme")] == [1, 2, 3, 4]
    assert {"views/first_batch", "attention/last_block_cls"} <= set(events.Tags()["images"])
    grid = events.Images("attention/last_block_cls")[-1]
    # 4 fixed images, one row each: the image and one map per head (2), 28 px tiles, 2 px padding.
    assert (grid.width, grid.height) == (3 * 28 + 4 * 2, 4 * 28 + 5 * 2)
    projector = (vit_run / "tb" / "projector_config.pbtxt").read_text()
    assert "embeddings/val" in projector
    metadata = next((vit_run / "tb").rglob("metadata.tsv")).read_text().splitlines()
    assert len(metadata) == 64 and all(0 <= int(label) < 10 for label in metadata)


def test_exported_backbone_loads_in_timm_with_the_same_features(vit_run: Path):
    ours = offline.load_backbone(offline.locate(vit_run), torch.device("cpu")).eval()
    # The run's backbone/ folder alone: timm reads architecture and arguments from its config.json.
    theirs = timm.create_model(f"local-dir:{vit_run / 'backbone'}", pretrained=True, num_classes=0).eval()
    images = torch.rand(3, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(theirs(images), ours(images), atol=1e-6, rtol=1e-5)  # two builds: kernels may differ
    views = yaml.safe_load((vit_run / "config.yaml").read_text())["data"]["views"]
    cfg = theirs.pretrained_cfg  # the run's evaluation input: 28 px, [0, 1] pixels (mean/std [])
    assert tuple(cfg["input_size"]) == (3, views["size"], views["size"]) and views["mean"] == []
    assert list(cfg["mean"]) == [0.0] * 3 and list(cfg["std"]) == [1.0] * 3
    assert cfg["crop_pct"] == views["size"] / views["resize"] and cfg["interpolation"] == views["interpolation"]
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **VIT_ARGS).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(images), ours(images), atol=1e-3)  # the weights did come from the file


def test_cls_attention_equals_the_unfused_softmax():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **VIT_ARGS).eval()
    images = torch.rand(2, 3, 28, 28)
    maps = attention.cls_attention(model, images)
    block = model.blocks[-1].attn
    block.fused_attn = False  # timm's plain path materialises softmax(q kᵀ) and passes it to attn_drop
    seen = []
    block.attn_drop.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model(images)
    expected = seen[0][:, :, 0, 1:].reshape(2, 2, 4, 4)
    torch.testing.assert_close(maps, expected, atol=1e-6, rtol=1e-5)
    assert maps.sum(dim=(2, 3)).max() <= 1 + 1e-6  # the [CLS] token's own weight is left out


def test_rankme_and_normalised_std_against_their_definitions():
    generator = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(64, 3, generator=generator))[0]
    right = torch.linalg.qr(torch.randn(16, 3, generator=generator))[0]
    three_equal = left @ torch.diag(torch.tensor([5.0, 5.0, 5.0])) @ right.T  # singular values 5, 5, 5, 0 × 13
    # RankMe's ε = 1e-7 on all 16 normalised singular values: exp(−Σ p ln p) with p = 1/3 + ε (×3), ε (×13).
    # What is left is float32 SVD noise on the 13 zeros (measured: 2.5e-6 of the value).
    eps, third = 1e-7, 1 / 3 + 1e-7
    expected = math.exp(-(3 * third * math.log(third) + 13 * eps * math.log(eps)))
    assert health.rankme(three_equal) == pytest.approx(expected, rel=1e-4)
    collapsed = torch.ones(32, 8) + 1e-9 * torch.randn(32, 8, generator=generator)
    assert health.normalized_std(collapsed) < 1e-6
    spread = torch.randn(20000, 8, generator=generator)
    assert health.normalized_std(spread) == pytest.approx(1 / math.sqrt(8), rel=0.05)


def test_collapse_warnings_fire_once_per_episode():
    watch = health.CollapseWatch()
    healthy = {"health/embedding_std": 0.3, "health/embedding_std_floor": 0.05}
    sick = {"health/embedding_std": 0.01, "health/embedding_std_floor": 0.05}
    assert watch.check(1, healthy) == []
    assert "collapsing" in watch.check(2, sick)[0]
    assert watch.check(3, sick) == []  # still the same episode
    assert watch.check(4, healthy) == [] and len(watch.check(5, sick)) == 1
    ln_k = math.log(65536)
    pinned = [watch.check(s, {"loss": ln_k * 0.999, "uniform_loss": ln_k}) for s in range(6, 10)]
    assert [len(w) for w in pinned] == [0, 0, 1, 0] and "ln K" in pinned[2][0]


def test_online_probe_trains_without_touching_the_backbones_gradients():
    def grads(probe: bool):
        # The probe is made after the method's own modules: the same initial weights.
        engine = setup(make_config("simclr", *(["eval.online_probe_classes=10"] if probe else [])), 0, 1)
        assert (engine.method.online_probe is not None) == probe
        batch = {**rank_batch(0, 0), "label": torch.tensor([0, 1, 2, -1])}
        out = engine.method(batch, 0)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in engine.method.named_parameters() if p.grad is not None}

    plain_out, plain = grads(probe=False)
    probe_out, with_probe = grads(probe=True)
    assert probe_out.loss.item() == pytest.approx(plain_out.loss.item() + probe_out.metrics["probe/loss"].item())
    assert probe_out.ssl_loss.item() == pytest.approx(plain_out.loss.item())
    for name, grad in plain.items():
        torch.testing.assert_close(with_probe[name], grad, atol=0, rtol=0)
    assert with_probe["online_probe.weight"].abs().sum() > 0


def test_distillation_stats_against_their_formulas():
    teacher = torch.softmax(torch.randn(6, 5), dim=-1)
    student = torch.randn(6, 5)
    stats = health.distillation_stats(teacher, student)
    q = torch.softmax(student, dim=-1)
    entropy = sum(-sum(p * math.log(p) for p in row.tolist()) for row in teacher) / 6
    kl = sum(sum(p * math.log(p / s) for p, s in zip(row.tolist(), srow.tolist(), strict=True))
             for row, srow in zip(teacher, q, strict=True)) / 6
    assert stats["teacher_entropy"].item() == pytest.approx(entropy, rel=1e-5)
    assert stats["teacher_student_kl"].item() == pytest.approx(kl, rel=1e-4)
    uniform = health.distillation_stats(torch.full((2, 8), 1 / 8), torch.zeros(2, 8))
    assert uniform["teacher_entropy"].item() == pytest.approx(math.log(8))
    assert uniform["teacher_student_kl"].item() == pytest.approx(0, abs=1e-6)


def test_ema_momentum_is_logged_for_methods_with_a_teacher(tmp_path: Path):
    from bigssl.train import train

    run = tmp_path / "run"
    train(make_config("test_tiny_ema", "data.train=quickstart:train", "data.views.size=32", "data.views.resize=32",
                      "data.workers=0", "optim.max_steps=2", "log.every_steps=1", f"log.dir={run}",
                      "log.tensorboard=false", "log.progress=false", "method.momentum=0.75",
                      "eval.knn_baseline=false", "eval.knn_at_end=false"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["ema_momentum"] for r in records if "loss" in r] == [0.75, 0.75]
