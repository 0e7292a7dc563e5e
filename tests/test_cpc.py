"""CPC v2: the grid InfoNCE against its formula written out, a context that never sees the rows
it predicts, and a patch encoder without batch statistics."""

from __future__ import annotations

import math

import pytest
import torch

from bigssl import losses, recipes
from bigssl.errors import ConfigError
from bigssl.methods import build
from bigssl.methods.cpc import ContextNetwork, oriented


def make_config(method: str, *keys: str):
    return recipes.load(None, [f"method.name={method}", "model.channels_last=false", *keys])


CPC_KEYS = ["data.views.policy=cpc", "model.backbone=resnet18", "model.backbone_args={channels: [4, 8, 8, 8], "
            "norm_layer: groupnorm1}", "model.small_stem=true", "method.context_dim=8", "method.steps=2"]


def test_cpc_loss_matches_the_formula():
    generator = torch.Generator().manual_seed(0)
    batch, dim, grid = 2, 3, 3
    z = torch.randn(batch, dim, grid, grid, generator=generator)
    predictions = [torch.randn(batch, dim, grid, grid, generator=generator) for _ in range(2)]
    cells = [(b, i, j) for b in range(batch) for i in range(grid) for j in range(grid)]
    per_step = []
    for k, prediction in enumerate(predictions, start=1):
        terms = []
        for b, i, j in cells:
            if i + k >= grid:
                continue
            scores = [float(prediction[b, :, i, j] @ z[c[0], :, c[1], c[2]]) for c in cells]
            positive = cells.index((b, i + k, j))
            terms.append(math.log(sum(math.exp(s) for s in scores)) - scores[positive])
        per_step.append(sum(terms) / len(terms))
    assert losses.cpc_loss(predictions, z).item() == pytest.approx(sum(per_step) / 2, rel=1e-5)


def test_context_at_a_row_never_sees_the_rows_below():
    torch.manual_seed(0)
    network = ContextNetwork(dim=4, width=8, layers=2, steps=2)
    z = torch.randn(1, 4, 5, 5)
    changed = z.clone()
    changed[:, :, 3:] = torch.randn(1, 4, 2, 5)  # rows 3 and 4
    before, after = network(z), network(changed)
    for k in range(2):
        torch.testing.assert_close(before[k][:, :, :3], after[k][:, :, :3])  # rows 0–2: unchanged
        assert not torch.allclose(before[k][:, :, 3:], after[k][:, :, 3:])
    grid = torch.arange(9.0).view(1, 1, 3, 3)
    assert oriented(grid, "up")[0, 0, 0].tolist() == [6, 7, 8]  # "up" predicts towards row 0
    assert oriented(grid, "right")[0, 0, 0].tolist() == [0, 3, 6]  # columns become rows


def test_cpc_trains_on_a_grid_of_patches():
    method = build(make_config("cpc", *CPC_KEYS))
    patches = torch.rand(9, 2, 3, 8, 8)  # a 3 × 3 grid of 8 px patches, 2 images
    out = method({"views": [patches]}, 0)
    # The codes rebuilt patch by patch into [B, D, row, column] (cell r·3 + c is row r, column c),
    # then the loss of every direction's context network, averaged.
    with torch.no_grad():
        z = torch.stack([torch.stack([torch.stack([method.backbone(patches[3 * r + c, b][None])[0]
                                                   for c in range(3)], dim=-1) for r in range(3)], dim=-2)
                         for b in range(2)])
        expected = sum(losses.cpc_loss(net(oriented(z, d)), oriented(z, d)) for d, net in method.context.items())
    assert out.loss.item() == pytest.approx(expected.item() / len(method.context), rel=1e-5)
    torch.testing.assert_close(out.features.detach(), z.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert method.backbone.conv1.weight.grad.abs().sum() > 0
    assert out.features.shape == (2, method.backbone.num_features)


def test_cpc_refuses_batch_norm_and_other_view_policies():
    with pytest.raises(ConfigError, match="model.backbone_args.norm_layer: the patch encoder has BatchNorm"):
        build(make_config("cpc", "data.views.policy=cpc", "model.backbone=resnet18", "model.small_stem=true"))
    with pytest.raises(ConfigError, match="data.views.policy: method cpc needs the cpc policy"):
        build(make_config("cpc", *CPC_KEYS, "data.views.policy=simclr"))
    with pytest.raises(ConfigError, match="method.directions"):
        build(make_config("cpc", *CPC_KEYS, "method.directions=[diagonal]"))
