"""nt_xent on 2 ranks × B samples equals 1 rank × 2B samples: loss and DDP-averaged gradients.

The same test with a plain (non-differentiable) all_gather shows why the gather must carry
gradient: the forward value still matches, the gradients do not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import run_distributed
from torch import nn

from bigssl import losses
from bigssl.config import Config
from bigssl.methods.base import Method, StepOutput
from bigssl.methods.context import RunContext, ViewLayout

WORLD, LOCAL_BATCH, DIM = 2, 4, 6


class TinyContrastive(Method):
    """A linear encoder trained with nt_xent: small enough to compare gradients exactly."""

    def __init__(self) -> None:
        config = Config()
        super().__init__(config.method, config.model, ViewLayout(), RunContext.of(config))

    def build(self) -> None:
        torch.manual_seed(0)
        self.backbone = nn.Linear(DIM, 5)

    def training_step(self, batch, step):
        view1, view2 = batch["views"]
        z1, z2 = self.backbone(view1), self.backbone(view2)
        return StepOutput(losses.nt_xent(z1, z2, temperature=0.2, gather=True))


def global_views() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(42)
    x = torch.randn(WORLD * LOCAL_BATCH, DIM, generator=generator, dtype=torch.float64).float()
    return x, x + 0.3 * torch.randn(x.shape, generator=generator, dtype=torch.float64).float()


def reference() -> tuple[float, dict[str, torch.Tensor]]:
    method = TinyContrastive()
    view1, view2 = global_views()
    loss = losses.nt_xent(method.backbone(view1), method.backbone(view2), temperature=0.2, gather=False)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in method.named_parameters()}


def _worker(rank: int, world_size: int, out_dir: str, plain_gather: bool) -> None:
    from bigssl.distributed import comm
    from bigssl.distributed.engines.ddp import DDPEngine
    from bigssl.distributed.env import DistEnv

    if plain_gather:  # what a naive implementation does: all_gather with no backward
        comm.gather_with_grad = comm.gather_no_grad
    engine = DDPEngine(Config(), DistEnv(rank=rank, world_size=world_size), torch.device("cpu"))
    engine.setup(TinyContrastive(), lambda m: torch.optim.SGD(m.parameters(), lr=0.0))
    view1, view2 = global_views()
    mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    loss = engine.forward({"views": [view1[mine], view2[mine]]}, step=0).loss
    engine.backward(loss)
    grads = {name: p.grad.clone() for name, p in engine.method.named_parameters()}
    torch.save({"loss": comm.all_reduce_mean(loss).item(), "grads": grads, "world": comm.world_size()},
               Path(out_dir) / f"rank{rank}.pt")


def run(tmp_path: Path, plain_gather: bool) -> list[dict]:
    run_distributed(_worker, WORLD, str(tmp_path), plain_gather)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert [r["world"] for r in results] == [WORLD, WORLD]
    return results


@pytest.mark.distributed
def test_gathered_nt_xent_matches_single_process(tmp_path: Path):
    ref_loss, ref_grads = reference()
    for result in run(tmp_path, plain_gather=False):
        assert result["loss"] == pytest.approx(ref_loss, rel=1e-5)
        for name, grad in ref_grads.items():  # sums over the 2 ranks' anchors in another order
            torch.testing.assert_close(result["grads"][name], grad, atol=1e-6, rtol=1e-5)


@pytest.mark.distributed
def test_plain_all_gather_breaks_gradient_equality(tmp_path: Path):
    ref_loss, ref_grads = reference()
    for result in run(tmp_path, plain_gather=True):
        assert result["loss"] == pytest.approx(ref_loss, rel=1e-5)  # the forward value cannot tell them apart
        worst = max((result["grads"][n] - g).abs().max().item() for n, g in ref_grads.items())
        scale = max(g.abs().max().item() for g in ref_grads.values())
        assert worst > 0.05 * scale, f"gradients differ by only {worst:.2e} (scale {scale:.2e})"
