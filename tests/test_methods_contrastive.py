"""The contrastive family's mechanics: MoCo's queue (pointer, contents, divisibility, identical
on every rank) and shuffle BN across ranks; InstDisc's memory bank, NCE with its estimated Z and
the softmax variant, against the formulas written out plainly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from engine_cases import BATCH, assert_same_loss_curve, make_config, rank_batch, save_result, setup, train_steps
from helpers import run_distributed

from bigssl.distributed import comm
from bigssl.errors import ConfigError
from bigssl.methods.memory_bank import noise_ids

NO_BN = "model.projector.batch_norm=false"


def moco(*extra: str, world_size: int = 1, rank: int = 0, global_batch: int | None = None):
    """`global_batch`: by default `world_size` ranks' batches; one process may hold several."""
    keys = ["moco", f"optim.batch_size={global_batch or BATCH * world_size}", "model.projector.hidden_dim=16", *extra]
    return setup(make_config(*keys), rank, world_size)


def test_moco_enqueues_normalised_keys_and_wraps_its_pointer():
    engine = moco(f"method.queue_size={3 * BATCH}", "optim.lr=0")  # lr 0: the key encoder stays as built
    method = engine.method
    initial = method.queue.clone()
    assert torch.allclose(initial.norm(dim=1), torch.ones(3 * BATCH))  # random unit keys to start
    for step in range(4):
        batch = rank_batch(0, step)
        with torch.no_grad():  # the key encoder on view 1, written out (BN sees the batch in any order)
            expected = F.normalize(method.key_projector(method.key_backbone(batch["views"][0][1])), dim=1)
        engine.forward(batch, step)
        slot = step % 3
        # Unit keys: rounding is relative to the norm 1; BN over 4 samples in another order magnifies
        # it (measured ≤ 3.7e-6 over SIMD levels and thread counts). The other view's key is 0.76 off.
        torch.testing.assert_close(method.queue[slot * BATCH : (slot + 1) * BATCH], expected, atol=2e-5, rtol=1e-5)
        assert int(method.queue_pointer) == (slot + 1) % 3 * BATCH
        if step < 2:  # the rows not yet written keep their initial keys
            torch.testing.assert_close(method.queue[(slot + 1) * BATCH :], initial[(slot + 1) * BATCH :])


def test_moco_queue_must_be_a_multiple_of_the_global_batch():
    with pytest.raises(ConfigError, match=r"method.queue_size: 10 .* optim.batch_size=4"):
        moco("method.queue_size=10")


def _record_queue(rank: int, world_size: int, extra: list[str], steps: int, out: Path) -> None:
    assert comm.world_size() == world_size == 2
    engine = moco(*extra, world_size=world_size, rank=rank)
    result = train_steps(engine, range(steps), lambda step: rank_batch(rank, step))
    save_result(out, rank, {**result, "queue": engine.method.queue.clone()})


@pytest.mark.distributed
@pytest.mark.parametrize("projector_bn", [False, True])
def test_moco_queue_is_identical_on_every_rank_and_equals_one_process(tmp_path: Path, projector_bn: bool):
    """2 ranks × 4 samples against 1 process × 8 with the key BN cut into the same 2 slices of
    one shuffled global batch: the queues (and, without BN in the queries, the losses) agree.
    With BN in the projector the ranks' queries differ from one process's (per-rank statistics),
    so one step is compared: its keys come from the shared initial key encoder through the
    shuffled slices, which checks the shuffle and unshuffle across ranks."""
    steps = 1 if projector_bn else 3
    extra = [f"method.queue_size={8 * BATCH}", *([] if projector_bn else [NO_BN])]
    run_distributed(_record_queue, 2, extra, steps, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close(ranks[0]["queue"], ranks[1]["queue"], atol=0, rtol=0)

    engine = moco(*extra, "method.key_bn_splits=2", world_size=1, global_batch=2 * BATCH)  # both ranks' samples
    both = lambda step: {"views": [torch.cat([rank_batch(r, step)["views"][0] for r in range(2)], dim=1)]}  # noqa: E731
    one = train_steps(engine, range(steps), both)
    written = slice(0, 2 * BATCH * steps)
    # unit keys, as in the 1-process queue test above
    torch.testing.assert_close(ranks[0]["queue"][written], engine.method.queue[written], atol=2e-5, rtol=1e-5)
    if not projector_bn:
        mean = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"], strict=True)]
        assert_same_loss_curve(mean, one["losses"])


BANK = 40


def instdisc(*extra: str, world_size: int = 1, rank: int = 0, global_batch: int | None = None):
    keys = ["instdisc", f"optim.batch_size={global_batch or BATCH * world_size}", "model.projector.layers=1",
            "model.projector.batch_norm=false", "method.negatives=6", *extra]
    engine = setup(make_config(*keys), rank, world_size, data_size=BANK)
    return engine


def id_batch(rank: int, step: int, world_size: int = 2) -> dict:
    """rank_batch's images with distinct global ids (the same samples for 1 or W processes)."""
    start = (step * BATCH * world_size + rank * BATCH) % BANK
    return {**rank_batch(rank, step), "id": torch.arange(start, start + BATCH) % BANK}


def test_instdisc_nce_loss_z_and_bank_update_follow_the_formulas():
    engine = instdisc("optim.lr=0")
    method, tau, m = engine.method, 0.07, 6
    bank = method.memory.bank.clone()
    assert bank.shape == (BANK, 16) and torch.allclose(bank.norm(dim=1), torch.ones(BANK))
    batch = id_batch(0, 0, world_size=1)
    with torch.no_grad():
        f = F.normalize(method.projector(method.backbone(batch["views"][0][0])), dim=1)
    loss = engine.forward(batch, 0).loss.item()
    noise = noise_ids(0, 0, BANK, m, BATCH)
    scores = [[float(f[i] @ bank[batch["id"][i]]) / tau] + [float(f[i] @ bank[j]) / tau for j in noise[i]]
              for i in range(BATCH)]
    z = BANK * sum(math.exp(s) for row in scores for s in row) / (BATCH * (m + 1))
    assert float(method.memory.normaliser) == pytest.approx(z, rel=1e-5)
    expected = 0.0
    for row in scores:
        p = [math.exp(s) / z for s in row]
        h = [q / (q + m / BANK) for q in p]
        expected -= math.log(h[0]) + sum(math.log(1 - x) for x in h[1:])
    assert loss == pytest.approx(expected / BATCH, rel=1e-5)
    for i, index in enumerate(batch["id"].tolist()):  # v ← normalise(0.5·v + 0.5·f)
        torch.testing.assert_close(method.memory.bank[index], F.normalize(0.5 * bank[index] + 0.5 * f[i], dim=0))
    untouched = [i for i in range(BANK) if i not in batch["id"].tolist()]
    torch.testing.assert_close(method.memory.bank[untouched], bank[untouched], atol=0, rtol=0)
    engine.forward(id_batch(0, 1, world_size=1), 1)
    assert float(method.memory.normaliser) == pytest.approx(z, rel=1e-5)  # estimated once, then frozen


@pytest.mark.parametrize("negatives", [6, 0])
def test_instdisc_softmax_variant_is_cross_entropy_over_the_sampled_or_whole_bank(negatives: int):
    engine = instdisc("method.loss=softmax", f"method.negatives={negatives}")
    method, tau = engine.method, 0.07
    bank = method.memory.bank.clone()
    batch = id_batch(0, 0, world_size=1)
    with torch.no_grad():
        f = F.normalize(method.projector(method.backbone(batch["views"][0][0])), dim=1)
    out = engine.forward(batch, 0)
    engine.backward(out.loss)  # after the bank's in-place update: the loss kept what it read
    loss = out.loss.item()
    candidates = noise_ids(0, 0, BANK, negatives, BATCH) if negatives else [list(range(BANK))] * BATCH
    expected = 0.0
    for i, index in enumerate(batch["id"].tolist()):
        positive = float(f[i] @ bank[index]) / tau
        others = [float(f[i] @ bank[j]) / tau for j in candidates[i]]
        # sampled: the positive is its own first logit; whole bank: it is one of the columns
        logits = others if not negatives else [positive, *others]
        expected -= positive - math.log(sum(math.exp(x) for x in logits))
    assert loss == pytest.approx(expected / BATCH, rel=1e-5)


def test_instdisc_without_sample_ids_is_a_config_error():
    engine = instdisc()
    with pytest.raises(ConfigError, match="data.train: the memory bank needs global sample ids"):
        engine.forward({**rank_batch(0, 0), "id": torch.full((BATCH,), -1)}, 0)


def _instdisc_ranks(rank: int, world_size: int, out: Path) -> None:
    assert comm.world_size() == world_size == 2
    engine = instdisc(world_size=2, rank=rank)
    result = train_steps(engine, range(3), lambda step: id_batch(rank, step))
    memory = engine.method.memory
    save_result(out, rank, {**result, "bank": memory.bank.clone(), "z": memory.normaliser.clone()})


@pytest.mark.distributed
def test_instdisc_bank_is_identical_on_every_rank_and_equals_one_process(tmp_path: Path):
    """Bank writes gathered from both ranks, Z all-reduced, noise drawn for the global batch:
    2 ranks × 4 samples give one process's bank, Z and losses on the 8 samples (no BN)."""
    run_distributed(_instdisc_ranks, 2, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close(ranks[0]["bank"], ranks[1]["bank"], atol=0, rtol=0)
    engine = instdisc(global_batch=2 * BATCH)  # one process holds both ranks' samples
    both = lambda step: {"views": [torch.cat([rank_batch(r, step)["views"][0] for r in range(2)], dim=1)],  # noqa: E731
                         "id": torch.cat([id_batch(r, step)["id"] for r in range(2)])}
    one = train_steps(engine, range(3), both)
    torch.testing.assert_close(ranks[0]["bank"], engine.method.memory.bank, atol=1e-5, rtol=1e-5)  # unit rows
    assert float(ranks[0]["z"]) == pytest.approx(float(engine.method.memory.normaliser), rel=1e-5)
    mean = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"], strict=True)]
    assert_same_loss_curve(mean, one["losses"])
    assert len(set(one["losses"])) == 3


def cmc(*extra: str):
    keys = ["cmc", f"optim.batch_size={BATCH}", "data.views.policy=cmc", "model.projector.layers=1",
            "model.projector.batch_norm=false", "method.negatives=6", *extra]
    return setup(make_config(*keys), 0, 1, data_size=BANK)


def lab_batch(step: int = 0) -> dict:
    generator = torch.Generator().manual_seed(step)
    lab = torch.rand(BATCH, 3, 32, 32, generator=generator) * 2 - 1
    return {"views": [lab[None, :, :1], lab[None, :, 1:]], "id": torch.arange(BATCH) + 3, "lab": lab}


def _cmc_views(method, lab: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [F.normalize(head(encoder(part)), dim=1) for encoder, head, part in
                zip(method.backbone.encoders, method.projectors, lab.split([1, 2], dim=1), strict=True)]


def test_cmc_in_batch_objective_is_the_sum_of_both_directions():
    engine = cmc("method.objective=batch")
    batch = lab_batch()
    l_view, ab_view = (v.tolist() for v in _cmc_views(engine.method, batch["lab"]))
    loss = engine.forward(batch, 0).loss.item()
    tau, expected = 0.07, 0.0
    for i in range(BATCH):
        to_ab = [sum(a * b for a, b in zip(l_view[i], ab_view[j], strict=True)) / tau for j in range(BATCH)]
        to_l = [sum(a * b for a, b in zip(ab_view[i], l_view[j], strict=True)) / tau for j in range(BATCH)]
        expected += math.log(sum(map(math.exp, to_ab))) - to_ab[i] + math.log(sum(map(math.exp, to_l))) - to_l[i]
    assert loss == pytest.approx(expected / BATCH, rel=1e-5)


def test_cmc_bank_objective_contrasts_each_view_with_the_other_views_bank():
    engine = cmc("method.loss=softmax", "optim.lr=0")
    method = engine.method
    banks = [m.bank.clone() for m in method.memories]
    batch = lab_batch()
    views = _cmc_views(method, batch["lab"])
    loss = engine.forward(batch, 0).loss.item()
    noise = noise_ids(0, 0, BANK, 6, BATCH)
    expected = 0.0
    for view, other_bank in ((views[0], banks[1]), (views[1], banks[0])):  # L vs ab's bank, ab vs L's bank
        for i, index in enumerate(batch["id"].tolist()):
            logits = [float(view[i] @ other_bank[index]) / 0.07] + [float(view[i] @ other_bank[j]) / 0.07
                                                                    for j in noise[i]]
            expected += math.log(sum(map(math.exp, logits))) - logits[0]
    assert loss == pytest.approx(expected / BATCH, rel=1e-5)
    for memory, view, bank in zip(method.memories, views, banks, strict=True):  # each bank keeps its own view
        for i, index in enumerate(batch["id"].tolist()):
            torch.testing.assert_close(memory.bank[index], F.normalize(0.5 * bank[index] + 0.5 * view[i], dim=0))


def test_cmc_trunk_concatenates_the_l_and_ab_encoders_on_a_lab_image():
    from bigssl.data.views import Photometric, rgb_to_lab

    engine = cmc()
    method = engine.method
    rgb = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    lab = Photometric(engine.config.data.views).normalize(rgb)  # the evaluation input of the cmc policy
    expected_l = (rgb_to_lab(rgb)[:, :1] - 50) / 50  # L in [0, 100] → [-1, 1]
    torch.testing.assert_close(lab[:, :1], expected_l, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        joint = method.backbone(lab)
        parts = [encoder(x) for encoder, x in zip(method.backbone.encoders, lab.split([1, 2], dim=1), strict=True)]
    torch.testing.assert_close(joint, torch.cat(parts, dim=1))
    with pytest.raises(ConfigError, match="data.views.policy: method cmc needs the cmc policy"):
        setup(make_config("cmc", "data.views.policy=simclr"), 0, 1, data_size=BANK)


@pytest.mark.parametrize("recipe", ["instdisc", "invaspread", "mocov2", "cmc", "cpc", "simclrv2"])
def test_quickstart_recipe_trains_two_steps_through_the_trainer(tmp_path: Path, recipe: str, monkeypatch):
    """The trainer feeds each method what it needs (sample ids for the banks, Lab views for CMC,
    patch grids for CPC) and logs the loss it returns; the full recipes run with `pytest -m quickstart`.
    Each step's batch and the method as it stood (weights, bank or queue, random state) are
    recorded; the logged loss is recomputed in this process from them, and the sample ids the
    banks are indexed by name the samples whose labels came with them (the dataset's own labels)."""
    import copy
    import json

    from helpers import REPO, SMALL

    from bigssl import recipes
    from bigssl.data import quickstart
    from bigssl.methods.base import Method
    from bigssl.train import train

    seen: list[tuple] = []
    original = Method.forward

    def recording(self, batch, step):
        seen.append((copy.deepcopy(self), copy.deepcopy(batch), step, torch.get_rng_state()))
        return original(self, batch, step)

    monkeypatch.setattr(Method, "forward", recording)
    path = REPO / "recipes" / "quickstart" / f"{recipe}.yaml"
    overrides = [*SMALL, f"log.dir={tmp_path / 'run'}", "optim.max_steps=2", "eval.knn_at_end=false",
                 "eval.knn_baseline=false", "eval.knn_pixels=false", "log.tensorboard=false", "log.progress=false"]
    train(recipes.load(path, overrides))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["loss"] for r in records if "loss" in r]
    assert len(logged) == len(seen) == 2
    monkeypatch.setattr(Method, "forward", original)
    for loss, (method, batch, step, rng) in zip(logged, seen, strict=True):
        torch.set_rng_state(rng)
        with torch.no_grad():
            assert loss == pytest.approx(method(batch, step).loss.item(), rel=1e-5)
    if recipe in ("instdisc", "cmc"):  # memory banks: one row per training sample, indexed by its id
        labels = torch.from_numpy(quickstart.load_arrays()["train_labels"]).long()
        for _, batch, _, _ in seen:
            assert torch.equal(labels[batch["id"]], batch["label"])
            assert len(set(batch["id"].tolist())) == len(batch["id"])
