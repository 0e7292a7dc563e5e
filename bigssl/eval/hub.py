"""A backbone as a folder in timm's hub layout: `config.json` + `model.safetensors`.

`config.json` is written by timm's own `save_config_for_hf` (what `push_to_hf_hub` uploads), so
`timm.create_model("local-dir:DIR", pretrained=True, num_classes=0)` rebuilds the architecture
from its `model_args` and reads the evaluation transform (input size, mean/std, interpolation,
resize-then-centre-crop as `crop_pct`) from its `pretrained_cfg`, and the folder can be pushed to
the Hugging Face hub unchanged.

Two bigssl architecture options have no timm form. The small ResNet stem (`model.small_stem`, a
single 3×3 conv1 with no max-pool): timm 1.0.31's ResNet builds conv1 as a 7×7 stride-2 conv or
a three-conv "deep" stem and always follows it with a pooling layer (or, with
`replace_stem_pool`, a stride-2 conv); no constructor argument removes both. And the grid readout
(`model.pool_grid`: the last map average-pooled to g×g and flattened): timm's `global_pool`
choices are global (avg, max, avgmax, catavgmax) or none. Such folders say so in config.json
(`bigssl.loader`) and load with `bigssl.load_backbone(DIR)`, which returns the plain timm ResNet
with its stem and pool swapped, exactly as training built it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models._hub import load_model_config_from_path, save_config_for_hf
from torch import nn

from bigssl import files
from bigssl.config import ModelConfig, ViewsConfig
from bigssl.errors import UserError
from bigssl.models.backbones import build_backbone, use_grid_pool, use_small_stem

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
# pretrained_cfg entries that describe the ImageNet weights timm ships for the architecture,
# not these: a bigssl export must not claim their tag, licence, paper or test-time recipe.
SOURCE_ONLY = ("tag", "license", "description", "origin_url", "paper_name", "paper_ids", "notes",
               "test_input_size", "test_crop_pct", "test_pool_size", "label_names", "label_descriptions",
               "label_offset")
TIMM_LOAD = 'timm.create_model("local-dir:{}", pretrained=True, num_classes=0)'
BIGSSL_LOAD = 'bigssl.load_backbone("{}")'


class NotOneTimmModel(ValueError):
    """The trunk's weights are not those of `model.backbone` (CMC's trunk is two encoders)."""


def load_line(folder: Path | str, config: dict[str, Any]) -> str:
    """The one line of Python that loads an exported folder."""
    loader = config.get("bigssl", {}).get("loader", "timm")
    return (TIMM_LOAD if loader == "timm" else BIGSSL_LOAD).format(folder)


def crop_pct(size: int, resize: int) -> float:
    """timm's eval transform resizes the short side to floor(size / crop_pct) then centre-crops
    `size`; size / resize in floating point can floor to resize - 1 (20 / (20 / 29) < 29), so
    step it down until timm gets `resize` back."""
    pct = size / resize
    while math.floor(size / pct) < resize:
        pct = math.nextafter(pct, 0.0)
    return pct


def eval_data_config(views: ViewsConfig) -> dict[str, Any]:
    """The run's evaluation view in timm's data-config terms. Empty mean/std means the run fed
    [0, 1] pixels: mean 0, std 1 (one value: timm repeats it per channel)."""
    return {"img_size": views.size, "mean": tuple(views.mean or [0.0]), "std": tuple(views.std or [1.0]),
            "interpolation": views.interpolation, "crop_pct": crop_pct(views.size, views.resize),
            "crop_mode": "center"}


def reference_model(model: ModelConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """`model.backbone` as bigssl builds it, on the meta device (no memory, no init cost), after
    checking that `state` holds exactly its weights."""
    with torch.device("meta"):
        reference = build_backbone(replace(model, channels_last=False))
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items()}
    if expected != given:
        unexpected, missing = sorted(set(given) - set(expected)), sorted(set(expected) - set(given))
        reshaped = sorted(k for k in set(expected) & set(given) if expected[k] != given[k])
        raise NotOneTimmModel(f"the backbone's weights are not those of model.backbone={model.backbone} "
                              f"(unexpected {unexpected[:2]}, missing {missing[:2]}, other shapes {reshaped[:2]})")
    return reference


def bigssl_loader_entries(model: ModelConfig) -> dict[str, Any]:
    """config.json's `bigssl` section: which loader rebuilds the backbone, and what it re-applies."""
    extra: dict[str, Any] = {"loader": "timm"}
    why = []
    if model.small_stem:
        extra["small_stem_stride"] = model.small_stem_stride
        why.append("a 3x3 conv1 without max-pool has no timm ResNet argument")
    if model.pool_grid > 1:
        extra["pool_grid"] = model.pool_grid
        why.append(f"average-pooling the last map to {model.pool_grid}x{model.pool_grid} and flattening it "
                   f"has no timm global_pool argument")
    if why:
        extra.update(loader="bigssl.load_backbone", why="; ".join(why))
    return extra


def write_folder(state: dict[str, torch.Tensor], model: ModelConfig, views: ViewsConfig, folder: Path) -> str:
    """Write `state` (the backbone's weights, timm's names) and its config into `folder`; returns
    the line that loads it. Each file is written under a temporary name and renamed over the
    old one only once both are complete, so a failed export leaves the previous folder whole."""
    reference = reference_model(model, state)
    # The reference is a private copy: editing its pretrained_cfg changes nothing the run uses.
    reference.pretrained_cfg = {k: v for k, v in reference.pretrained_cfg.items() if k not in SOURCE_ONLY}
    extra = bigssl_loader_entries(model)
    extra["load"] = load_line("<this folder>", {"bigssl": extra})
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a directory (a .safetensors path writes one file)")
    with files.failing_as(folder):
        folder.mkdir(parents=True, exist_ok=True)
    weights_tmp, config_tmp = files.temporary(folder / WEIGHTS), files.temporary(folder / CONFIG)
    try:
        tensors = {name: t.detach().cpu().contiguous() for name, t in state.items()}
        with files.failing_as(folder / WEIGHTS):
            save_file(tensors, str(weights_tmp), metadata={"format": "pt", "producer": "bigssl"})
            files.sync(weights_tmp)
        try:
            with files.failing_as(folder / CONFIG):
                save_config_for_hf(reference, str(config_tmp), model_config={"bigssl": extra},
                                   data_config=eval_data_config(views))
                files.sync(config_tmp)
        except ValueError as err:  # e.g. a fixed-size ViT whose img_size is not data.views.size
            raise UserError(f"model.backbone_args / data.views: {err}") from err
        with files.failing_as(folder):  # both complete: only now does either replace its old version
            os.replace(weights_tmp, folder / WEIGHTS)
            os.replace(config_tmp, folder / CONFIG)
    finally:
        weights_tmp.unlink(missing_ok=True)
        config_tmp.unlink(missing_ok=True)
    return load_line(folder, {"bigssl": extra})


def load_backbone(folder: str | Path) -> nn.Module:
    """The backbone of an exported folder as a plain timm model, whichever loader it needs:
    timm's own `local-dir:` loader where timm can express the architecture, otherwise (the small
    ResNet stem, the grid pool) the timm model rebuilt from config.json's `model_args` with
    bigssl's stem and pool. Its
    `pretrained_cfg` is the folder's, so `timm.data.resolve_data_config(model=m)` and
    `timm.data.create_transform` give the run's evaluation transform. Returned in training mode,
    as timm returns models: call `.eval()` before extracting features."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG).read_text())
    except FileNotFoundError:
        raise UserError(f"{folder}: no {CONFIG} (not an exported backbone folder)") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{folder / CONFIG}: not valid JSON ({err})") from None
    if not (folder / WEIGHTS).is_file():
        raise UserError(f"{folder}: no {WEIGHTS}")
    entries = config.get("bigssl", {})
    stride, grid = entries.get("small_stem_stride"), entries.get("pool_grid")
    if stride is None and grid is None:
        return timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0)
    pretrained_cfg, architecture, model_args = load_model_config_from_path(folder)
    model = timm.create_model(architecture, pretrained=False, **model_args)
    if stride is not None:
        use_small_stem(model, int(stride))
    if grid is not None:
        use_grid_pool(model, int(grid))
    model.load_state_dict(load_file(folder / WEIGHTS))
    model.pretrained_cfg = pretrained_cfg
    return model
