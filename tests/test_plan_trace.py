"""The planner's traced step does not depend on what ran before it in the process: DeepSpeed's
ZeRO-3 leaves torch.nn.functional.linear replaced by its own autograd.Function for good (as
tools/gpu_check.py's step checks do before its throughput runs trace the step)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bigssl import recipes

TINY_DINO = ["method.name=dino", "model.backbone=vit_tiny_patch16_224", "model.channels_last=false",
             "model.backbone_args={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, "
             "dynamic_img_size: true}", "data.views.policy=dino", "data.views.size=32", "data.views.local_size=16",
             "data.views.local_crops=2", "method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16",
             "optim.name=adamw", "optim.batch_size=8", "engine.precision=bf16"]


class _TransposingLinear(torch.autograd.Function):
    """A linear as DeepSpeed's LinearFunctionForZeroStage3 computes it: `weight.t()` inside the
    forward, where grad mode is off, is a leaf that requires grad (a view made under no_grad), and
    a temporary."""

    @staticmethod
    def forward(x, weight, bias):
        out = x.matmul(weight.t())
        return out + bias

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass


def test_low_precision_casts_cache_weights_not_temporary_views():
    from bigssl.plan.trace import _LowPrecisionMatmuls, _torch_linear

    # torch's own F.linear, as the trace runs it: an earlier ZeRO-3 engine in this process (the
    # full suite builds several) leaves DeepSpeed's linear in its place.
    with _torch_linear(), torch.device("meta"):
        wide, narrow = torch.nn.Linear(32, 128), torch.nn.Linear(128, 32)
        x = torch.empty(5, 17, 32)
        with _LowPrecisionMatmuls(torch.bfloat16) as low:
            for _ in range(20):  # each temporary view's id is free for the next one's
                y = _TransposingLinear.apply(_TransposingLinear.apply(x, wide.weight, wide.bias), narrow.weight,
                                             narrow.bias)
                assert y.shape == (5, 17, 32)
            y = F.linear(x, wide.weight, wide.bias)
    assert y.dtype == torch.bfloat16
    assert set(low.weights) == {id(wide.weight), id(wide.bias)}  # what F.linear got, cast once; no views


def test_trace_after_deepspeed_replaced_linear_is_torch_linear_trace(monkeypatch):
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    from bigssl.plan.trace import trace

    config = recipes.load(None, TINY_DINO)
    plain = trace(config, 2)
    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
    after = trace(config, 2)
    assert torch.nn.functional.linear is zero3_linear_wrap  # the process's own, put back
    assert (after.flops, after.activation_bytes) == (plain.flops, plain.activation_bytes)
    assert after.collectives == plain.collectives
