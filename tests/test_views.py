"""View policies: published settings, crop geometry, group shapes, the device half."""

from __future__ import annotations

import math
import random

import pytest
import torch

from bigssl import recipes
from bigssl.config import ModelConfig
from bigssl.data import geometry as geo
from bigssl.data.views import EvalGeometry, Geometry, Photometric, view_grid
from bigssl.methods.base import flat
from bigssl.models.backbones import build_backbone


def views_for(policy: str, *overrides: str):
    return recipes.load(None, [f"data.views.policy={policy}", *overrides]).data.views


def test_policies_resolve_to_the_published_settings():
    dino = views_for("dino")
    assert (dino.size, dino.views, dino.local_crops, dino.local_size) == (224, 2, 8, 96)
    assert dino.crop_scale == [0.4, 1.0] and dino.local_crop_scale == [0.05, 0.4]
    assert dino.blur_prob == [1.0, 0.1] and dino.local_blur_prob == 0.5
    assert dino.solarize_prob == [0.0, 0.2] and dino.interpolation == "bicubic"
    swav = views_for("swav")
    assert (swav.local_crops, swav.crop_scale, swav.local_crop_scale) == (6, [0.14, 1.0], [0.05, 0.14])
    assert swav.std == [0.228, 0.224, 0.225]
    byol = views_for("byol")
    assert byol.jitter == [0.4, 0.4, 0.2, 0.1] and byol.blur_prob == [1.0, 0.1] and byol.solarize_prob == [0.0, 0.2]
    instdisc = views_for("instdisc")
    assert instdisc.grayscale_first and instdisc.jitter_prob == 1.0 and instdisc.jitter == [0.4] * 4
    assert views_for("mocov2").blur_prob == [0.5] and views_for("simclr").mean == []
    assert views_for("simclr").jitter == [0.8, 0.8, 0.8, 0.2]
    cpc = views_for("cpc")
    assert (cpc.size, cpc.resize, cpc.grid, cpc.patch, cpc.patch_jitter) == (256, 300, 7, 64, 4)
    # Overrides win; sizes derived from the global size scale with it.
    small = views_for("dino", "data.views.size=32", "data.views.local_crops=4", "data.views.blur_prob=[0.3]")
    assert (small.local_size, small.local_crops, small.blur_prob) == (14, 4, [0.3])


def test_random_resized_crop_boxes_respect_scale_and_ratio():
    rng = random.Random(0)
    areas, ratios = [], []
    for _ in range(2000):
        top, left, h, w = geo.random_resized_crop_box(375, 500, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert top >= 0 and top + h <= 375 and left >= 0 and left + w <= 500
        areas.append(h * w / (375 * 500))
        ratios.append(w / h)
    assert min(areas) >= 0.075 and max(areas) <= 1.0 and 0.4 < sum(areas) / len(areas) < 0.6
    assert min(ratios) > 0.7 and max(ratios) < 1.4
    assert sum(r > 1 for r in ratios) / len(ratios) > 0.3  # log-uniform: both sides well represented


@pytest.mark.parametrize(("policy", "overrides", "shapes"), [
    ("simclr", ["data.views.size=24"], [(2, 3, 24, 24)]),
    ("dino", ["data.views.size=32", "data.views.local_crops=3"], [(2, 3, 32, 32), (3, 3, 14, 14)]),
    ("swav", ["data.views.size=32"], [(2, 3, 32, 32), (6, 3, 14, 14)]),
    ("cmc", ["data.views.size=24"], [(1, 3, 24, 24)]),
    ("cpc", ["data.views.size=32"], [(49, 3, 8, 8)]),
    ("clip", ["data.views.size=24"], [(1, 3, 24, 24)]),
])
def test_geometry_cuts_every_group_as_uint8(policy: str, overrides: list[str], shapes: list[tuple]):
    views = views_for(policy, *overrides)
    image = torch.randint(0, 256, (3, 45, 60), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    random.seed(0)
    groups = Geometry(views)(image)
    assert [tuple(g.shape) for g in groups] == shapes and all(g.dtype == torch.uint8 for g in groups)
    assert EvalGeometry(views)(image).shape == (3, views.size, views.size)


def test_crop_of_the_whole_image_without_flip_is_the_image():
    image = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    assert torch.equal(geo.crop_resize(geo.as_batch(image), (0, 0, 20, 20), 20), image)
    assert torch.equal(geo.crop_resize(geo.as_batch(image), (0, 0, 20, 20), 20, flip=True), image.flip(-1))


def test_photometric_turns_collated_groups_into_channels_last_views():
    views = views_for("dino", "data.views.size=32", "data.views.local_crops=3")
    images = [torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8) for _ in range(5)]
    random.seed(1)
    per_image = [Geometry(views)(im) for im in images]
    collated = [torch.stack([groups[g] for groups in per_image]) for g in range(2)]  # [B, V, C, S, S]
    out = Photometric(views)(collated, torch.Generator().manual_seed(0))
    assert [tuple(g.shape) for g in out] == [(2, 5, 3, 32, 32), (3, 5, 3, 14, 14)]
    batch = flat(out[0])
    assert batch.is_contiguous(memory_format=torch.channels_last) and batch.dtype == torch.float32
    # The values, view by view: out[g][v, b] is image b's crop v, through the draws of row v·B + b
    # (the group's views drawn in turn, B each, from the one generator), then (x − mean) / std.
    from bigssl.data import photometric as ph
    from bigssl.data.views import group_specs

    mean = torch.tensor(views.mean).view(3, 1, 1)
    std = torch.tensor(views.std).view(3, 1, 1)
    generator = torch.Generator().manual_seed(0)
    for spec, group, got in zip(group_specs(views), collated, out, strict=True):
        params = ph.Params.cat([ph.sample_params(v, 5, torch.device("cpu"), generator) for v in spec.views])
        for v in range(group.shape[1]):
            for b in range(5):
                row = slice(v * 5 + b, v * 5 + b + 1)
                x = ph.augment(group[b, v][None].float() / 255, params.rows(row), spec.blur_kernel,
                               spec.grayscale_first)[0]
                torch.testing.assert_close(got[v, b], (x - mean) / std, rtol=1e-5, atol=1e-6)
    assert view_grid(out, Photometric(views)).shape[0] == 3


def test_photometric_in_cache_sized_chunks_equals_one_pass_over_the_batch(monkeypatch):
    from bigssl.data import photometric as ph
    from bigssl.data import views as views_module

    views = views_for("simclr", "data.views.size=16")
    group = torch.randint(0, 256, (6, 2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(views_module, "CPU_CHUNK_PIXELS", 2 * 16 * 16)  # 2 images per chunk: 6 chunks
    (chunked,) = Photometric(views)([group], torch.Generator().manual_seed(7))
    # The same draws, applied to all 12 views at once (view-major), written out without chunks.
    generator = torch.Generator().manual_seed(7)
    spec = views_module.group_specs(views)[0]
    params = ph.Params.cat([ph.sample_params(v, 6, torch.device("cpu"), generator) for v in spec.views])
    assert params.jitter.any() and params.blur.any() and params.grayscale.any()
    whole = ph.augment(group.transpose(0, 1).flatten(0, 1).float() / 255, params, spec.blur_kernel)
    torch.testing.assert_close(flat(chunked), whole, atol=1e-6, rtol=1e-5)


def test_cmc_views_are_l_and_ab():
    views = views_for("cmc", "data.views.size=16")
    group = torch.randint(0, 256, (4, 1, 3, 16, 16), dtype=torch.uint8)
    luminance, chroma = Photometric(views)([group])
    assert luminance.shape == (1, 4, 1, 16, 16) and chroma.shape == (1, 4, 2, 16, 16)
    assert luminance.abs().max() <= 1.0 + 1e-5 and chroma.abs().max() <= 1.0 + 1e-5  # Lab ranges, normalised
    white = Photometric(views)([torch.full((1, 1, 3, 16, 16), 255, dtype=torch.uint8)])
    assert math.isclose(white[0].mean().item(), 1.0, abs_tol=1e-3)  # L = 100
    assert white[1].abs().max() < 0.2  # white has almost no chroma


def test_a_vit_takes_global_and_local_crops():
    """A 14 px local crop in 8 px patches: zero-padded right and bottom to 16 px (a 2 × 2 grid, the
    position table resampled to it), so its features are exactly the padded image's."""
    import torch.nn.functional as F

    model = build_backbone(ModelConfig(backbone="vit_tiny_patch16_224", channels_last=False, backbone_args={
        "img_size": 32, "patch_size": 8, "depth": 2, "dynamic_img_size": True, "dynamic_img_pad": True})).eval()
    generator = torch.Generator().manual_seed(0)
    image, local = torch.rand(2, 3, 32, 32, generator=generator), torch.rand(2, 3, 14, 14, generator=generator)
    with torch.no_grad():
        assert model(image).shape == model(local).shape == (2, 192)
        torch.testing.assert_close(model(local), model(F.pad(local, (0, 2, 0, 2))), rtol=1e-5, atol=1e-6)
        # Not the features of its first patch alone (a 1 × 1 grid: 14 px cut down instead of padded).
        assert not torch.allclose(model(local), model(local[..., :8, :8]), rtol=1e-3, atol=1e-3)
