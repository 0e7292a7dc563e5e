"""VICReg (bigssl/methods/vicreg.py): its loss against the paper's equations written out here (as the
official code weighs them), 2 ranks against one process with the whole batch, the method's loss
on its own modules, its config checks, its ImageNet recipe's schedule, and a few CLI steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_cases import BATCH, make_config, setup
from helpers import REPO, SMALL, fair_warmup_cosine, run_cli, run_distributed, run_threaded
from torch import nn

from bigssl import recipes
from bigssl.distributed import comm
from bigssl.errors import ConfigError
from bigssl.methods.vicreg import vicreg_loss
from bigssl.optim import lr_schedule

RECIPE = REPO / "recipes" / "quickstart" / "vicreg.yaml"
IMAGENET = REPO / "recipes" / "imagenet" / "vicreg_resnet50.yaml"


def _embeddings(n: int, d: int, seed: int) -> torch.Tensor:
    """Dimensions with stds from 0.3 to 2: the variance hinge is active on some, idle on others."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.3, 2.0, d, dtype=torch.float64)
    mixed = torch.randn(d, d, generator=generator, dtype=torch.float64) * 0.3 + torch.eye(d, dtype=torch.float64)
    return (torch.randn(n, d, generator=generator, dtype=torch.float64) * scale) @ mixed + 0.5  # correlated, shifted


def _written_out(z1: torch.Tensor, z2: torch.Tensor, lam: float = 25.0, mu: float = 25.0, nu: float = 1.0,
                 gamma: float = 1.0, eps: float = 1e-4) -> dict[str, torch.Tensor]:
    """arXiv 2105.04906 §3: s(Z, Z') = 1/n Σ_i ‖z_i − z'_i‖²; v(Z) = 1/d Σ_j max(0, γ − √(Var(z^j) + ε)),
    Var unbiased; C(Z) = 1/(n−1) Σ_i (z_i − z̄)(z_i − z̄)ᵀ, c(Z) = 1/d Σ_{i≠j} C(Z)²_ij. Weighed as
    the official main_vicreg.py does: s / d (F.mse_loss is a mean over n·d), ½ v per branch."""
    n, d = z1.shape

    def v(z: torch.Tensor) -> torch.Tensor:
        var = ((z - z.mean(0)) ** 2).sum(0) / (n - 1)
        return torch.clamp(gamma - torch.sqrt(var + eps), min=0).sum() / d

    def c(z: torch.Tensor) -> torch.Tensor:
        centred = z - z.mean(0)
        cov = sum(torch.outer(row, row) for row in centred) / (n - 1)
        off = ~torch.eye(d, dtype=torch.bool)
        return (cov[off] ** 2).sum() / d

    s = ((z1 - z2) ** 2).sum(1).mean()
    terms = {"invariance": s / d, "variance": (v(z1) + v(z2)) / 2, "covariance": c(z1) + c(z2)}
    terms["loss"] = lam * terms["invariance"] + mu * terms["variance"] + nu * terms["covariance"]
    return terms


def test_loss_and_its_gradient_are_the_written_out_formula():
    z1, z2 = _embeddings(24, 8, seed=1), _embeddings(24, 8, seed=2)
    expected = _written_out(z1, z2)
    assert expected["variance"].item() > 0 and expected["covariance"].item() > 0.01  # every term at work
    a, b = z1.float().requires_grad_(True), z2.float().requires_grad_(True)
    loss, terms = vicreg_loss(a, b)
    for name in ("invariance", "variance", "covariance"):
        assert terms[name].item() == pytest.approx(expected[name].item(), rel=1e-5), name
    assert loss.item() == pytest.approx(expected["loss"].item(), rel=1e-5)
    loss.backward()
    x, y = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    _written_out(x, y)["loss"].backward()
    torch.testing.assert_close(a.grad.double(), x.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(b.grad.double(), y.grad, rtol=1e-4, atol=1e-7)
    # Other weights, γ and ε reach their terms.
    weighted, _ = vicreg_loss(z1.float(), z2.float(), 2.0, 3.0, 5.0, std_target=1.5, eps=1e-2)
    assert weighted.item() == pytest.approx(_written_out(z1, z2, 2.0, 3.0, 5.0, 1.5, 1e-2)["loss"].item(), rel=1e-5)


def test_loss_refuses_mismatched_or_single_sample_batches():
    with pytest.raises(ValueError, match="one shape"):
        vicreg_loss(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        vicreg_loss(torch.zeros(1, 3), torch.zeros(1, 3))


# ------------------------------------------------------------- 2 ranks × B == 1 rank × 2B
B, D = 6, 5


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return _embeddings(2 * B, D, seed=3).float(), _embeddings(2 * B, D, seed=4).float()


def _loss_and_grads(z1: torch.Tensor, z2: torch.Tensor, gather: bool = True) -> dict[str, torch.Tensor]:
    z1, z2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    loss, terms = vicreg_loss(z1, z2, gather=gather)
    loss.backward()
    return {"loss": loss.detach(), **terms, "grad1": z1.grad.clone(), "grad2": z2.grad.clone()}


def _rank(rank: int, world_size: int) -> dict[str, dict[str, torch.Tensor]]:
    assert comm.world_size() == world_size == 2
    rows = slice(rank * B, (rank + 1) * B)
    z1, z2 = (z[rows] for z in _global_batch())
    return {"global": _loss_and_grads(z1, z2), "local": _loss_and_grads(z1, z2, gather=False)}


def _worker(rank: int, world_size: int, out: Path) -> None:
    torch.save(_rank(rank, world_size)["global"], out / f"rank{rank}.pt")


@pytest.mark.parametrize("ranks_as", ["threads", pytest.param("processes", marks=pytest.mark.distributed)])
def test_two_ranks_give_the_global_batch_loss_and_gradients(tmp_path: Path, ranks_as: str):
    """Each rank's variance and covariance are the global batch's, the mean of the ranks' losses is
    the single-process loss (the invariance is each rank's own mean), and each rank's gradient is
    2 × the single-process one for its rows, which the engine's average over ranks halves."""
    if ranks_as == "processes":
        run_distributed(_worker, 2, tmp_path)
        ranks = [{"global": torch.load(tmp_path / f"rank{r}.pt", weights_only=True)} for r in range(2)]
    else:
        ranks = run_threaded(_rank, 2)
    single = _loss_and_grads(*_global_batch())
    for rank, result in enumerate(ranks):
        rows, out = slice(rank * B, (rank + 1) * B), result["global"]
        for term in ("variance", "covariance"):
            assert out[term].item() == pytest.approx(single[term].item(), rel=1e-5), term
        torch.testing.assert_close(out["grad1"] / 2, single["grad1"][rows], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out["grad2"] / 2, single["grad2"][rows], rtol=1e-4, atol=1e-6)
        if ranks_as == "threads":  # without the gather a rank sees its half batch alone
            assert result["local"]["covariance"].item() != pytest.approx(single["covariance"].item(), rel=1e-3)
    mean = (ranks[0]["global"]["loss"] + ranks[1]["global"]["loss"]) / 2
    assert mean.item() == pytest.approx(single["loss"].item(), rel=1e-5)
    mean_invariance = (ranks[0]["global"]["invariance"] + ranks[1]["global"]["invariance"]) / 2
    assert mean_invariance.item() == pytest.approx(single["invariance"].item(), rel=1e-5)


# ------------------------------------------------------------------------------ the method
def test_method_loss_is_the_formula_on_its_own_embeddings():
    """Recomputed from the method's backbone and expander (eval mode: BN fixed, so both see the
    same network); the expander is the official one: Linear, BN, ReLU, then a Linear without bias."""
    method = setup(make_config("vicreg"), 0, 1).method.eval()
    linears = [m for m in method.projector if isinstance(m, nn.Linear)]
    assert len(linears) == 2 and linears[-1].bias is None and isinstance(method.projector[-1], nn.Linear)
    assert [type(m) for m in method.projector[1:3]] == [nn.BatchNorm1d, nn.ReLU]
    views = torch.rand((2, BATCH, 3, 32, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = method({"views": [views], "label": torch.zeros(BATCH, dtype=torch.long)}, 0)
        z = [method.projector(method.backbone(views[v])).double() for v in range(2)]
    expected = _written_out(*z)
    assert out.loss.item() == pytest.approx(expected["loss"].item(), rel=1e-5)
    assert out.metrics["covariance"].item() == pytest.approx(expected["covariance"].item(), rel=1e-5)
    assert out.embedding.shape == (BATCH, 16) and out.features.shape[0] == BATCH


def test_an_output_batch_norm_is_refused():
    from bigssl.methods import build

    with pytest.raises(ConfigError, match="model.projector.last_batch_norm"):
        build(make_config("vicreg", "model.projector.last_batch_norm=true"))


@pytest.mark.parametrize(("override", "message"), [
    ("method.variance_weight=-1", "method.variance_weight: must be >= 0, got -1.0"),
    ("method.variance_eps=0", "method.variance_eps: must be > 0, got 0.0"),
    ("method.std_target=nan", "method.std_target: must be a finite number, got nan"),
])
def test_config_values_are_checked(override: str, message: str):
    with pytest.raises(ConfigError) as caught:
        recipes.load(RECIPE, [override])
    assert str(caught.value) == message


def test_found_by_name_without_a_configs_entry_and_without_torch():
    """bigssl/methods/vicreg.py alone makes `vicreg` a built-in: listed by names() and the unknown
    method error, which still import no torch (the file is read, not imported)."""
    from bigssl.methods import names
    from bigssl.methods.configs import CONFIGS

    assert "vicreg" not in CONFIGS and "vicreg" in names()
    probe = ("import sys\nfrom bigssl import recipes\nfrom bigssl.errors import ConfigError\n"
             "try:\n    recipes.load(None, ['method.name=nope'])\nexcept ConfigError as err:\n    print(err)\n"
             "print('HEAVY', sorted(m for m in ('torch', 'timm') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr
    known = result.stdout.split("known: ", 1)[1].splitlines()[0].split(", ")
    assert "vicreg" in known and "barlow" in known


def test_imagenet_recipe_schedule_is_the_official_one():
    """main_vicreg.py adjust_learning_rate written out: peak 0.2 × batch/256, linear warm-up from 0
    over 10 epochs, then a cosine to 0.001 × the peak, every step; LARS, wd 1e-6 off biases and BN."""
    config = recipes.load(IMAGENET, [])
    optim = config.optim
    assert (optim.name, optim.batch_size, optim.epochs, optim.weight_decay) == ("lars", 2048, 1000, 1e-6)
    assert optim.exclude_bias_norm and optim.no_decay_lr_scale == 1.0
    steps_per_epoch = 3
    max_steps, warmup_steps, base = optim.epochs * steps_per_epoch, 10 * steps_per_epoch, 0.2 * 2048 / 256
    schedule = lr_schedule(optim, steps_per_epoch, max_steps)
    for step in range(max_steps):
        official = fair_warmup_cosine(step, base, warmup_steps, max_steps)
        assert schedule(step) == pytest.approx(official, rel=1e-9, abs=1e-15), step
    method = config.method
    assert (method.invariance_weight, method.variance_weight, method.covariance_weight) == (25.0, 25.0, 1.0)
    assert (config.model.projector.hidden_dim, config.model.projector.out_dim, config.model.projector.layers) == (
        8192, 8192, 3)


def test_quickstart_recipe_trains_through_the_cli(tmp_path: Path):
    """A few steps of the real recipe, smaller: each logged loss is 25·invariance + 25·variance +
    1·covariance of the terms logged beside it."""
    run = tmp_path / "run"
    result = run_cli("train", str(RECIPE), *SMALL, "optim.max_steps=3", "eval.knn_pixels=false",
                     "eval.knn_at_end=false", "eval.knn_baseline=false", "log.progress=false", f"log.dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for record in steps:
        combined = 25 * record["invariance"] + 25 * record["variance"] + record["covariance"]
        assert record["loss"] == pytest.approx(combined, rel=1e-5)
        assert 0 <= record["variance"] <= 1  # the hinge at γ = 1: at most 1 per branch, halved and summed
