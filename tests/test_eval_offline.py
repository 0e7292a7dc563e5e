"""`bigssl eval knn|linear` on a saved run, and the linear probe against plain facts."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import QUICKSTART, SMALL, free_port, run_cli, torch_threads

from bigssl.eval import linear

EVAL_DATA = ["--train", "quickstart:train", "--val", "quickstart:val", "--workers", "1"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("eval") / "run"
    result = run_cli("train", str(QUICKSTART), *SMALL, f"log.dir={run}", "optim.max_steps=3",
                     "eval.knn_baseline=false", "eval.knn_pixels=false")  # the trained backbone's kNN only
    assert result.returncode == 0, result.stderr
    return run


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_offline_knn_equals_the_trainers_final_knn(trained_run: Path):
    """The backbone rebuilt from config.yaml + the last checkpoint scores exactly what the live
    backbone scored at the end of training (same k, T, data and eval view)."""
    at_end = next(r for r in records(trained_run) if "knn/top1" in r)
    result = run_cli("eval", "knn", str(trained_run), *EVAL_DATA)
    assert result.returncode == 0, result.stderr
    offline = records(trained_run)[-1]
    assert offline["step"] == at_end["step"] == 3
    assert offline["eval/knn_top1"] == at_end["knn/top1"]
    assert offline["eval/knn_top5"] == at_end["knn/top5"]
    assert "weighted kNN (k=20, T=0.07)" in result.stdout and "top1" in result.stdout


@pytest.mark.distributed
def test_offline_knn_on_two_processes_matches_one(trained_run: Path):
    one = run_cli("eval", "knn", str(trained_run), *EVAL_DATA, "--k", "5")
    assert one.returncode == 0, one.stderr
    single = records(trained_run)[-1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", "-m"]
    two = run_cli("eval", "knn", str(trained_run), *EVAL_DATA, "--k", "5", launcher=launcher)
    assert two.returncode == 0, two.stderr
    assert "rank 0 of 2" in two.stderr and "rank 1 of 2" in two.stderr
    double = records(trained_run)[-1]
    assert double["eval/knn_k"] == 5
    assert double["eval/knn_top1"] == pytest.approx(single["eval/knn_top1"], abs=1e-9)


def test_features_from_the_first_projector_layer(trained_run: Path):
    """SimCLR v2's downstream features: backbone → Linear → BN → ReLU of the projector, rebuilt
    here by hand from the checkpoint, score what `--projector-layers 1` reports."""
    from bigssl import recipes
    from bigssl.data.shards import resolve
    from bigssl.data.views import Photometric
    from bigssl.eval import knn
    from bigssl.models.backbones import build_backbone

    result = run_cli("eval", "knn", str(trained_run), *EVAL_DATA, "--projector-layers", "1")
    assert result.returncode == 0, result.stderr
    reported = records(trained_run)[-1]["eval/knn_top1"]
    config = recipes.load(trained_run / "config.yaml", [])
    state = torch.load(trained_run / "checkpoints" / "step_00000003" / "state.pt", weights_only=True)["method"]
    backbone = build_backbone(config.model)
    backbone.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("backbone.")})
    width = config.model.projector.hidden_dim
    first = torch.nn.Linear(backbone.num_features, width, bias=False)
    norm = torch.nn.BatchNorm1d(width)
    first.weight.data = state["projector.0.weight"]
    norm.load_state_dict({k[12:]: v for k, v in state.items() if k.startswith("projector.1.")})
    model = torch.nn.Sequential(backbone, first, norm, torch.nn.ReLU())
    views = config.data.views
    args = (views, Photometric(views).normalize, 256, 1, torch.device("cpu"))
    with torch_threads(1):  # as the CLI's process
        train, val = (knn.extract(model, resolve(s, "x"), *args) for s in ("quickstart:train", "quickstart:val"))
    assert train.features.shape[1] == width
    assert knn.weighted_knn(train, val)["top1"] == pytest.approx(reported, abs=1e-9)
    at_end = next(r for r in records(trained_run) if "knn/top1" in r)["knn/top1"]
    assert reported != at_end  # not the backbone's features
    too_deep = run_cli("eval", "knn", str(trained_run), *EVAL_DATA, "--projector-layers", "3")
    assert too_deep.returncode == 2
    assert too_deep.stderr.strip().splitlines()[-1].endswith("--projector-layers: the projector has 2 linear layers, "
                                                            "not 3")


def test_offline_linear_probe_reports_top1_and_top5(trained_run: Path):
    result = run_cli("eval", "linear", str(trained_run), *EVAL_DATA, "--epochs", "10", "--batch-size", "256")
    assert result.returncode == 0, result.stderr
    record = records(trained_run)[-1]
    assert record["eval/linear_epochs"] == 10 and record["eval/linear_batch_size"] == 256
    assert 0.35 < record["eval/linear_top1"] <= record["eval/linear_top5"] <= 1  # 10 classes: chance is 0.1
    assert "simclr protocol: sgd" in result.stdout


def test_eval_of_a_missing_run_is_one_line(tmp_path: Path):
    result = run_cli("eval", "knn", str(tmp_path / "nope"), *EVAL_DATA)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no such run or checkpoint" in result.stderr


def _clusters(n: int, seed: int, shuffle_labels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(4, 16) * 6  # fixed across calls: train and val share them
    labels = torch.randint(0, 4, (n,), generator=generator)
    x = centres[labels] + torch.randn(n, 16, generator=generator)
    if shuffle_labels:
        labels = labels[torch.randperm(n, generator=generator)]
    return x, labels


@pytest.mark.parametrize("method", ["simclr", "moco"])  # nesterov SGD + cosine, SGD + step decay
def test_probe_separates_separable_classes_and_not_random_labels(method: str):
    protocol = linear.protocol_for(method, "resnet50")
    protocol = replace(protocol, epochs=20, batch_size=64)
    train_x, train_y = _clusters(512, 0)
    val_x, val_y = _clusters(256, 1)
    assert linear.train_probe(train_x, train_y, val_x, val_y, protocol)["top1"] > 0.97
    noise_x, noise_y = _clusters(512, 2, shuffle_labels=True)
    chance = linear.train_probe(noise_x, noise_y, val_x, val_y, protocol)["top1"]
    assert chance < 0.45  # 4 classes: 0.25 expected


def test_protocols_follow_the_published_settings():
    assert linear.protocol_for("moco", "resnet50").lr_for(512) == 30.0  # no scaling
    assert linear.protocol_for("simclr", "resnet50").lr_for(4096) == pytest.approx(1.6)  # 0.1 × 4096/256
    assert linear.protocol_for("mocov3", "vit_small_patch16_224").lr_for(1024) == pytest.approx(12.0)
    step = linear.protocol_for("moco", "resnet50")
    assert [linear._lr_factor(step, e) for e in (0, 59.9, 60, 80)] == pytest.approx([1, 1, 0.1, 0.01])
    cosine = linear.protocol_for("dino", "vit_small_patch16_224")
    assert [linear._lr_factor(cosine, e) for e in (0, 50, 100)] == pytest.approx([1, 0.5, 0])

