"""Exports in timm's hub layout: what timm (or bigssl.load_backbone) rebuilds from the folder
alone has the trained backbone's features, and its pretrained_cfg is the run's evaluation
transform."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from helpers import QUICKSTART, REPO, SMALL, run_cli
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config
from torchvision import transforms

import bigssl
from bigssl import recipes
from bigssl.config import ModelConfig, ViewsConfig
from bigssl.errors import ConfigError, UserError
from bigssl.eval import hub, offline
from bigssl.eval.export import save_backbone
from bigssl.methods.cmc import SplitViewEncoder
from bigssl.models.backbones import GridPool, build_backbone

FLOAT32 = {"rtol": 1e-5, "atol": 1e-6}
TINY_VIT = {"img_size": 28, "patch_size": 7, "embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory) -> Path:
    """Two steps of the quickstart recipe (a small-stem ResNet, stride 2; [0, 1] pixels), its
    evaluation view resizing to 32 px before the 28 px centre crop."""
    run = tmp_path_factory.mktemp("export") / "run"
    result = run_cli("train", str(QUICKSTART), *SMALL, f"log.dir={run}", "optim.max_steps=2",
                     "data.views.resize=32", "eval.knn_at_end=false", "eval.knn_baseline=false",
                     "eval.knn_pixels=false")
    assert result.returncode == 0, result.stderr
    return run


def assert_eval_transform(model: torch.nn.Module, views: dict):
    """timm's own eval transform, built from the loaded model's pretrained_cfg, is the run's:
    short side to `resize`, centre crop `size`, the run's mean/std ([] = none: 0 and 1)."""
    cfg = model.pretrained_cfg
    assert tuple(cfg["input_size"]) == (3, views["size"], views["size"])
    assert list(cfg["mean"]) == (views["mean"] or [0.0, 0.0, 0.0])
    assert list(cfg["std"]) == (views["std"] or [1.0, 1.0, 1.0])
    steps = create_transform(**resolve_data_config(model=model)).transforms
    resize, crop = steps[0], steps[1]
    assert isinstance(resize, transforms.Resize) and resize.size == views["resize"]
    assert resize.interpolation.value == views["interpolation"]
    assert isinstance(crop, transforms.CenterCrop) and tuple(crop.size) == (views["size"], views["size"])


def test_small_stem_resnet_run_loads_from_its_folder_alone(resnet_run: Path):
    folder = resnet_run / "backbone"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert not (resnet_run / "backbone.safetensors").exists()  # the weights are written once
    config = json.loads((folder / "config.json").read_text())
    assert config["bigssl"]["loader"] == "bigssl.load_backbone" and config["bigssl"]["small_stem_stride"] == 2
    assert config["bigssl"]["pool_grid"] == 2  # the quickstart's 2×2 readout
    # Why: stock timm builds a 7×7 conv1 from these model_args, and the 3×3 weights do not fit.
    with pytest.raises(RuntimeError, match="conv1.weight"):
        timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0)

    loaded = bigssl.load_backbone(folder).eval()
    assert type(loaded) is timm.models.resnet.ResNet
    assert loaded.conv1.kernel_size == (3, 3) and loaded.conv1.stride == (2, 2)
    assert isinstance(loaded.maxpool, torch.nn.Identity)
    assert isinstance(loaded.global_pool, GridPool) and loaded.global_pool.grid == 2
    assert loaded.num_features == 4 * loaded.layer4[-1].conv2.out_channels
    # Compared with the backbone rebuilt from the run's config.yaml and its last checkpoint.
    trained = offline.load_backbone(offline.locate(resnet_run), torch.device("cpu")).eval()
    images = torch.rand(4, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), trained(images), **FLOAT32)
    views = yaml.safe_load((resnet_run / "config.yaml").read_text())["data"]["views"]
    assert views["mean"] == [] and views["resize"] == 32
    assert_eval_transform(loaded, views)


def test_cli_export_writes_the_same_folder_or_one_file(resnet_run: Path, tmp_path: Path):
    result = run_cli("export", str(resnet_run), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert f'bigssl.load_backbone("{tmp_path / "out"}")' in result.stdout
    # The run's last checkpoint holds the weights the run ended with.
    exported, at_end = load_file(tmp_path / "out" / "model.safetensors"), load_file(resnet_run / "backbone" /
                                                                                    "model.safetensors")
    assert exported.keys() == at_end.keys()
    assert all(torch.equal(exported[k], at_end[k]) for k in at_end)
    assert (json.loads((tmp_path / "out" / "config.json").read_text())
            == json.loads((resnet_run / "backbone" / "config.json").read_text()))

    single = tmp_path / "weights.safetensors"
    result = run_cli("export", str(resnet_run), str(single))
    assert result.returncode == 0, result.stderr
    assert "load it with" not in result.stdout
    assert all(torch.equal(load_file(single)[k], at_end[k]) for k in at_end)


def test_dynamic_size_vit_loads_in_timm_with_no_other_argument(tmp_path: Path):
    model = ModelConfig(backbone="vit_tiny_patch16_224", backbone_args={**TINY_VIT, "dynamic_img_size": True})
    views = recipes.load(REPO / "recipes" / "quickstart" / "dino.yaml", []).data.views  # ImageNet mean/std
    views.size, views.resize = 28, 32
    ours = build_backbone(model).eval()
    hub.write_folder(ours.state_dict(), model, views, tmp_path / "vit")
    theirs = timm.create_model(f"local-dir:{tmp_path / 'vit'}", pretrained=True, num_classes=0).eval()
    for side in (28, 42):  # the trained size, and another that dynamic_img_size accepts
        images = torch.rand(2, 3, side, side)
        with torch.no_grad():
            torch.testing.assert_close(theirs(images), ours(images), **FLOAT32)
    assert_eval_transform(theirs, {"size": 28, "resize": 32, "mean": views.mean, "std": views.std,
                                   "interpolation": views.interpolation})
    assert views.mean and views.interpolation == "bicubic"  # a normalising, bicubic view really was checked


def test_a_failed_export_leaves_the_previous_folder_whole(tmp_path: Path):
    model = ModelConfig(backbone="vit_tiny_patch16_224", backbone_args=TINY_VIT)  # a fixed 28 px input
    views = ViewsConfig(size=28, resize=28, mean=[], std=[], interpolation="bilinear")
    folder = tmp_path / "vit"
    hub.write_folder(build_backbone(model).state_dict(), model, views, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    views.size = views.resize = 32  # timm refuses: the model takes 28 px only
    with pytest.raises(UserError, match="requires"):
        hub.write_folder(build_backbone(model).state_dict(), model, views, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_crop_pct_gives_timm_the_resize_back():
    for size in range(8, 80):
        for resize in range(size, 2 * size):
            steps = create_transform(input_size=(3, size, size), crop_pct=hub.crop_pct(size, resize)).transforms
            assert steps[0].size == resize, (size, resize)


def test_a_trunk_timm_has_no_model_for_is_written_as_one_file(tmp_path: Path):
    config = recipes.load(REPO / "recipes" / "quickstart" / "cmc.yaml", [])
    trunk = SplitViewEncoder(config.model)  # CMC: two encoders, on L and on ab
    with pytest.raises(hub.NotOneTimmModel, match="encoders"):
        hub.reference_model(config.model, trunk.state_dict())
    assert save_backbone(trunk, config, tmp_path) == tmp_path / "backbone.safetensors"
    written = load_file(tmp_path / "backbone.safetensors")
    assert written.keys() == trunk.state_dict().keys()
    assert all(torch.equal(written[k], v) for k, v in trunk.state_dict().items())
    assert not (tmp_path / "backbone").exists()


def test_grid_pool_concatenates_the_mean_of_each_cell():
    """model.pool_grid=2 on a 4×4 last map: each channel's four 2×2 quadrant means, channel-major
    (the flatten of a (C, 2, 2) map), written out by hand."""
    model = build_backbone(ModelConfig(backbone="resnet18", pool_grid=2, channels_last=False,
                                       backbone_args={"channels": [8, 8, 8, 8]})).eval()
    images = torch.rand(3, 3, 128, 128)
    with torch.no_grad():
        last = model.forward_features(images)
        assert last.shape[-2:] == (4, 4)
        quadrants = [last[:, :, r:r + 2, c:c + 2].mean(dim=(2, 3)) for r in (0, 2) for c in (0, 2)]
        expected = torch.stack(quadrants, dim=2).flatten(1)  # (B, C, 4 cells) → channel-major
        torch.testing.assert_close(model(images), expected, **FLOAT32)
    assert model.num_features == 8 * 4


def test_grid_pool_is_refused_where_there_is_no_average_global_pool():
    with pytest.raises(ConfigError, match="model.pool_grid"):
        build_backbone(ModelConfig(backbone="vit_tiny_patch16_224", pool_grid=2,
                                   backbone_args={"img_size": 28, "patch_size": 7}))
