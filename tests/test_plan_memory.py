"""The planner's per-rank memory model against tools/bench_memory.py, which adds up the bytes of
the tensors rank 0 of 2 gloo processes really holds after a training step under each engine."""

from __future__ import annotations

import sys

import pytest
from helpers import REPO

sys.path.insert(0, str(REPO / "tools"))

TINY_VIT = ("model.backbone_args={img_size: 32, patch_size: 8, embed_dim: 30, depth: 2, num_heads: 3}",)
# bench_memory's "gradients" is every other storage the rank holds: besides the gradients, a few
# hundred bytes of engine state (DDP, FSDP2) and DeepSpeed's work buffers (ZeRO-1/2: of the
# order of the reduction bucket's fill, ~13 kB here).
SLACK = 16 * 1024


@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "fsdp"])
def test_memory_model_matches_bench_memory(engine: str):
    import bench_memory
    from memory_method import FEATURES_METHOD

    from bigssl import recipes
    from bigssl.plan.engines import OVERRIDES, engine_memory
    from bigssl.plan.trace import trace

    measured = bench_memory.measure("vit_tiny_patch16_224", engine, TINY_VIT, side=32)
    config = recipes.load(None, [f"method.name={FEATURES_METHOD}", "model.backbone=vit_tiny_patch16_224",
                                    "model.channels_last=false", "optim.name=adamw", "optim.lr=0.0001",
                                    "optim.batch_size=2", "data.views.size=32", *TINY_VIT, *OVERRIDES[engine]])
    predicted = engine_memory(trace(config, 2), engine, "adamw", "fp32")
    assert measured["parameters"] == predicted.parameters
    assert measured["optimizer"] == predicted.optimizer
    assert measured["master"] == predicted.master
    assert predicted.gradients <= measured["gradients"] <= predicted.gradients + SLACK, (measured, predicted)
