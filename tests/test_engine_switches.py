"""Engine switches that change how the backbone runs but not what it computes."""

from __future__ import annotations

import pytest
import torch
from engine_cases import make_config, rank_batch, setup

from bigssl.errors import ConfigError


def loss_and_grads(*overrides: str) -> tuple[float, dict[str, torch.Tensor], int]:
    """One forward + backward of SimCLR on a tiny ViT; also counts calls of the first block."""
    engine = setup(make_config("simclr", *overrides), rank=0, world_size=1)
    calls = []
    block = engine.method.backbone.blocks[0]
    plain_forward = block.forward

    def counting_forward(*args, **kwargs):  # forward hooks do not fire in checkpoint recomputation
        calls.append(1)
        return plain_forward(*args, **kwargs)

    block.forward = counting_forward
    loss = engine.forward(rank_batch(0, 0), 0).loss
    engine.backward(loss)
    grads = {n: p.grad.clone() for n, p in engine.method.named_parameters() if p.grad is not None}
    return loss.item(), grads, len(calls)


def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients():
    plain_loss, plain_grads, plain_calls = loss_and_grads()
    loss, grads, calls = loss_and_grads("engine.activation_checkpointing=true")
    assert plain_calls == 1 and calls == 2  # the block ran again in backward
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-6, rtol=1e-5)


def test_compiled_backbone_computes_what_the_eager_one_does():
    eager_loss, eager_grads, _ = loss_and_grads()
    engine = setup(make_config("simclr", "engine.compile=true"), rank=0, world_size=1)
    assert engine.method.backbone._compiled_call_impl is not None
    loss = engine.forward(rank_batch(0, 0), 0).loss
    engine.backward(loss)
    assert loss.item() == pytest.approx(eager_loss, rel=1e-5)
    for name, param in engine.method.named_parameters():  # fused kernels reorder float sums
        torch.testing.assert_close(param.grad, eager_grads[name], atol=2e-3, rtol=2e-3)


def test_compile_is_refused_under_deepspeed_with_a_clear_error():
    with pytest.raises(ConfigError, match="engine.compile"):
        setup(make_config("simclr", "engine.kind=deepspeed", "engine.compile=true"), rank=0, world_size=1)
