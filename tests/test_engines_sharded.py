"""Sharded engines against DDP on 2 gloo processes: same losses, exact EMA teachers on local
shards, exact resume, and FSDP2 checkpoints that load at another world size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_cases import (
    ENGINES,
    NO_BN,
    assert_same_loss_curve,
    engine_keys,
    global_batch,
    make_config,
    rank_batch,
    save_result,
    setup,
    train_steps,
)
from helpers import run_distributed
from safetensors.torch import load_file

from bigssl import cli
from bigssl.checkpoint import Checkpointer
from bigssl.distributed import comm
from bigssl.errors import CheckpointError

STEPS = 5
CHECKPOINT = "run/checkpoints/step_00000003"  # what _save_and_continue writes
pytestmark = pytest.mark.distributed
# LARS (BYOL/Barlow rule) for SimCLR, LARC (apex/SwAV rule) for the EMA method: under ZeRO the
# optimizer steps flat partitions of many parameters, and the trust ratio must still be each
# whole tensor's, as DDP's and FSDP2's are.
OPTIMIZERS = {"simclr": ["optim.name=lars"], "test_tiny_ema": ["optim.name=lars", "optim.lars_rule=larc"]}


def _train(rank: int, world_size: int, method: str, engine: str, out: Path) -> None:
    assert comm.world_size() == world_size == 2
    engine_ = setup(make_config(method, *OPTIMIZERS[method], *engine_keys(engine)), rank, world_size)
    result = train_steps(engine_, range(STEPS), lambda step: rank_batch(rank, step), track_ema=True)
    if engine == "zero3":  # fp32 masters are the parameter partitions, not copies of them
        groups = len(engine_.optimizer.optimizer.param_groups)
        result["master_groups_shared"] = (engine_.master_groups_shared, groups)
    save_result(out, rank, result)


def run(tmp_path: Path, method: str, engine: str) -> list[dict]:
    out = tmp_path / f"{method}-{engine}"
    out.mkdir()
    run_distributed(_train, 2, method, engine, out)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[str, list[dict]]:
    root = tmp_path_factory.mktemp("ddp")
    return {method: run(root, method, "ddp") for method in ("simclr", "test_tiny_ema")}


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("method", ["simclr", "test_tiny_ema"])
def test_sharded_engines_reproduce_ddp(tmp_path: Path, ddp_runs, method: str, engine: str):
    ddp, fsdp = ddp_runs[method], run(tmp_path, method, engine)
    for rank in range(2):
        assert len(ddp[rank]["losses"]) == STEPS
        # SimCLR on the tiny ViT at lr 0.05 magnifies a perturbation up to ~8× per update (its loss
        # jumps 5.5 → 7.7 → 8.1 → 6.8 → 8.8 under LARS): rounding measured up to 2.5e-5 after 4
        # updates (gloo workers on 1 thread each, AVX-512; 1.5e-5 under LARS), while one trust ratio
        # per ZeRO partition instead of per tensor moved it by 3.5e-4 after 1 update and 2.2e-2
        # after 2 (LARC on the EMA method: 3.8e-4 after 2).
        assert_same_loss_curve(fsdp[rank]["losses"], ddp[rank]["losses"], rtol_per_step=5e-5)
    assert ddp[0]["losses"][0] != ddp[0]["losses"][-1]  # it trained
    if engine == "zero3":
        shared, groups = fsdp[0]["master_groups_shared"]
        assert shared == groups > 0
    if method == "test_tiny_ema":
        for result in (*ddp, *fsdp):  # the teacher, gathered, is the full-tensor EMA of the student
            assert len(result["teacher"]) == len(result["reference"]) > 10
            for teacher, reference in zip(result["teacher"], result["reference"], strict=True):
                # the same EMA formula on the same values, in a different op order (lerp, foreach, shards)
                torch.testing.assert_close(teacher, reference, atol=1e-6, rtol=1e-5)


def _save_and_continue(rank: int, world_size: int, keys: list[str], checkpoint: Path, out: Path) -> None:
    """3 steps, a checkpoint, 2 more steps; records the losses and the whole backbone at the save."""
    assert comm.world_size() == world_size == 2
    engine_ = setup(make_config(*keys), rank, world_size)
    first = train_steps(engine_, range(3), lambda step: rank_batch(rank, step))
    # Through the Checkpointer, so it has the manifest that export requires.
    assert Checkpointer(checkpoint.parent.parent, keep=1, is_main=rank == 0).save(3, engine_, {"step": 3}) == checkpoint
    whole = engine_.full_module(engine_.method.backbone).state_dict()  # a collective: every rank
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in whole.items()}, out / "backbone_at_save.pt")
    rest = train_steps(engine_, range(3, STEPS), lambda step: rank_batch(rank, step))
    save_result(out, rank, {"losses": first["losses"] + rest["losses"]})


def _resume(rank: int, world_size: int, keys: list[str], checkpoint: Path, out: Path) -> None:
    assert comm.world_size() == world_size == 2
    engine_ = setup(make_config(*keys), rank, world_size)
    assert engine_.load(checkpoint) == {"step": 3}
    save_result(out, rank, train_steps(engine_, range(3, STEPS), lambda step: rank_batch(rank, step)))


@pytest.mark.parametrize("engine", ["ddp", *ENGINES])
def test_resume_continues_exactly(tmp_path: Path, engine: str):
    checkpoint, straight, resumed = tmp_path / CHECKPOINT, tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    keys = ["test_tiny_ema", *engine_keys(engine)]
    run_distributed(_save_and_continue, 2, keys, checkpoint, straight)
    run_distributed(_resume, 2, keys, checkpoint, resumed)
    assert_same_losses_after_resume(straight, resumed)
    # `bigssl export` merges any engine's checkpoint into the backbone it held, in one process (this
    # one: the command's code without a process start; tests/test_export.py runs it as a process).
    exported = tmp_path / "backbone.safetensors"
    assert cli.main(["export", str(checkpoint), str(exported)]) == 0
    expected = torch.load(straight / "backbone_at_save.pt", weights_only=True)
    weights = load_file(exported)
    assert set(weights) == set(expected) and len(weights) > 10
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, atol=0, rtol=0)


class _Planted:
    """Unpickling this with full pickle creates a file: what a crafted checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _load_only(rank: int, world_size: int, keys: list[str], checkpoint: Path) -> None:
    assert comm.world_size() == world_size == 2
    engine_ = setup(make_config(*keys), rank, world_size)
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: refused: it holds more than tensors"):
        engine_.load(checkpoint)


def test_deepspeed_checkpoints_load_weights_only(tmp_path: Path):
    checkpoint, straight = tmp_path / CHECKPOINT, tmp_path / "straight"
    straight.mkdir()
    keys = ["test_tiny_ema", *engine_keys("zero2")]
    run_distributed(_save_and_continue, 2, keys, checkpoint, straight)
    states = checkpoint / "zero" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "code-ran"
    state = torch.load(states, weights_only=False)  # our own file, trusted here
    torch.save({**state, "planted": _Planted(marker)}, states)
    run_distributed(_load_only, 2, keys, checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_per_parameter_clipping_on_shards_equals_whole_parameters(tmp_path: Path, engine: str):
    """FSDP2 clips each parameter by the norm of its whole gradient (shards summed): it follows
    the 1-process run of the same joint batch with no BatchNorm; clip 0.05 binds on most tensors."""
    keys = ["simclr", f"engine.kind={engine}", NO_BN, "optim.clip_grad=0.05", "optim.clip_grad_per_parameter=true"]
    out = tmp_path / engine
    out.mkdir()
    run_distributed(_train_keys, 2, keys, out)
    two_ranks = [torch.load(out / f"rank{r}.pt", weights_only=True)["losses"] for r in range(2)]
    engine_ = setup(make_config(*keys), rank=0, world_size=1)
    one = train_steps(engine_, range(STEPS), lambda step: global_batch(2, step))["losses"]
    assert_same_loss_curve([(a + b) / 2 for a, b in zip(*two_ranks, strict=True)], one)


def _train_keys(rank: int, world_size: int, keys: list[str], out: Path) -> None:
    assert comm.world_size() == world_size == 2
    engine_ = setup(make_config(*keys), rank, world_size)
    save_result(out, rank, train_steps(engine_, range(STEPS), lambda step: rank_batch(rank, step)))


def assert_same_losses_after_resume(straight: Path, resumed: Path) -> None:
    for rank in range(2):
        uninterrupted = torch.load(straight / f"rank{rank}.pt", weights_only=True)["losses"]
        after_resume = torch.load(resumed / f"rank{rank}.pt", weights_only=True)["losses"]
        assert len(set(uninterrupted)) == STEPS  # the loss moves
        assert after_resume == uninterrupted[3:]  # bit for bit


# Small heads; DINO's teacher temperature warms up across the checkpoint (a function of the step).
MULTI_CROP = {"dino": ["method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16",
                       "method.teacher_temp_warmup_epochs=5"],
              "swav": ["method.prototypes=16", "method.freeze_prototypes_epochs=0"]}


@pytest.mark.parametrize(("method", "engine"), [("dino", "fsdp"), ("dino", "zero3"), ("swav", "zero2")])
def test_self_distillation_state_resumes_exactly(tmp_path: Path, method: str, engine: str):
    """DINO's centre (a buffer the loss reads every step) and EMA teacher, SwAV's prototypes:
    after a checkpoint round trip through a sharded engine the losses continue bit for bit."""
    checkpoint, straight, resumed = tmp_path / CHECKPOINT, tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    keys = [method, *engine_keys(engine), *MULTI_CROP[method]]
    run_distributed(_save_and_continue, 2, keys, checkpoint, straight)
    run_distributed(_resume, 2, keys, checkpoint, resumed)
    assert_same_losses_after_resume(straight, resumed)


def test_fsdp2_checkpoint_of_two_ranks_resumes_on_one(tmp_path: Path):
    """SimCLR with gathered negatives and no BatchNorm (whose statistics are per rank): the mean
    of the ranks' losses is the one-process loss of their joint batch, so a 2 → 1 resume must
    continue the same loss curve."""
    checkpoint, straight = tmp_path / CHECKPOINT, tmp_path / "straight"
    straight.mkdir()
    run_distributed(_save_and_continue, 2, ["simclr", "fsdp", NO_BN], checkpoint, straight)
    two_ranks = [torch.load(straight / f"rank{r}.pt", weights_only=True)["losses"] for r in range(2)]
    expected = [(a + b) / 2 for a, b in zip(two_ranks[0], two_ranks[1], strict=True)]

    engine = setup(make_config("simclr", "fsdp", NO_BN), rank=0, world_size=1)  # a private 1-rank group
    assert engine.load(checkpoint) == {"step": 3}
    resumed = train_steps(engine, range(3, STEPS), lambda step: global_batch(2, step))["losses"]
    assert_same_loss_curve(resumed, expected[3:], first_step=3)

