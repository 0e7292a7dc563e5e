from pathlib import Path

import pytest
import torch
from helpers import run_distributed, run_threaded


def rows(rank: int) -> torch.Tensor:
    count = 3 if rank == 0 else 1  # uneven, as shards split over ranks often are
    return torch.arange(count * 2, dtype=torch.float32).reshape(count, 2) + 100 * rank


def _worker(rank: int, world_size: int, out_dir: str) -> None:
    from bigssl.distributed import comm

    gathered = comm.gather_variable(rows(rank))
    empty = comm.gather_variable(torch.zeros(0, 0) if rank == 1 else rows(rank))  # shape unknown when empty
    mean = comm.all_reduce_mean(torch.tensor(float(rank)))
    torch.save({"gathered": gathered, "empty": empty, "mean": mean, "world": comm.world_size()},
               Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.distributed
def test_variable_size_gather_and_mean(tmp_path: Path):
    run_distributed(_worker, 2, str(tmp_path))
    expected = torch.cat([rows(0), rows(1)])
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["world"] == 2
        assert torch.equal(result["gathered"], expected)
        assert torch.equal(result["empty"], rows(0))  # a rank with no samples contributes nothing
        assert result["mean"].item() == 0.5


def _vote(rank: int, world_size: int, out_dir: str) -> None:
    from bigssl.distributed import comm

    assert comm.world_size() == world_size == 2
    # (finite here, stop signal here) per rank → what every rank must conclude.
    cases = {"all fine": [(True, False), (True, False)], "nan on rank 1": [(True, False), (False, False)],
             "signal on rank 1": [(True, False), (True, True)], "both": [(False, True), (True, False)]}
    results = {name: comm.agree(*flags[rank]) for name, flags in cases.items()}
    torch.save(results, Path(out_dir) / f"{rank}.pt")


@pytest.mark.distributed
def test_the_per_step_vote_is_the_same_on_every_rank(tmp_path: Path):
    run_distributed(_vote, 2, str(tmp_path))
    expected = {"all fine": (True, False), "nan on rank 1": (False, False), "signal on rank 1": (True, True),
                "both": (False, True)}
    for rank in range(2):
        assert torch.load(tmp_path / f"{rank}.pt", weights_only=False) == expected


# Integer-valued float32 tensors: every sum below is exact, so the gradients compare bit for bit.
def _local(rank: int) -> torch.Tensor:
    return torch.arange(6, dtype=torch.float32).reshape(3, 2) + 10 * rank


def _weights(rank: int) -> torch.Tensor:
    """Rank r's weight on the gathered [6, 2] tensor: different on every rank."""
    return (torch.arange(12, dtype=torch.float32).reshape(6, 2) - 5) * (rank + 2)


def _reduce_weights(rank: int) -> torch.Tensor:
    return torch.tensor([3.0, -1.0]) * (rank + 1)


def _gradients(rank: int, world_size: int) -> dict:
    from bigssl.distributed import comm

    assert comm.world_size() == world_size == 2
    x = _local(rank).requires_grad_(True)
    gathered = comm.gather_with_grad(x)
    (gathered * _weights(rank)).sum().backward()
    y = torch.tensor([1.0, 2.0]).mul(rank + 1).requires_grad_(True)
    reduced = comm.all_reduce_sum_with_grad(y)
    (reduced * _reduce_weights(rank)).sum().backward()
    return {"gathered": gathered.detach(), "plain": type(gathered) is torch.Tensor, "grad": x.grad,
            "reduced": reduced.detach(), "reduce_grad": y.grad}


def _differentiable(rank: int, world_size: int, out_dir: str) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the supported collectives: no deprecation warning on any call
        result = _gradients(rank, world_size)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def _check_gradients(results: list[dict]) -> None:
    """gather_with_grad: rank r's x gets the sum over all ranks of their loss weights on r's rows
    (d/dx_r of Σ_r' sum(w_r' · cat(x))); all_reduce_sum_with_grad: every rank's y gets Σ_r' v_r'."""
    for rank, result in enumerate(results):
        assert result["plain"]  # a plain tensor for the losses, not an AsyncCollectiveTensor
        assert torch.equal(result["gathered"], torch.cat([_local(0), _local(1)]))
        rows = slice(3 * rank, 3 * rank + 3)
        assert torch.equal(result["grad"], _weights(0)[rows] + _weights(1)[rows])
        assert torch.equal(result["reduced"], torch.tensor([3.0, 6.0]))  # [1, 2] + [2, 4]
        assert torch.equal(result["reduce_grad"], _reduce_weights(0) + _reduce_weights(1))


@pytest.mark.distributed
def test_differentiable_collectives_send_every_ranks_gradient_back(tmp_path: Path):
    """Two gloo processes."""
    run_distributed(_differentiable, 2, str(tmp_path))
    _check_gradients([torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)])


def test_differentiable_collectives_send_every_ranks_gradient_back_in_one_process():
    """The same backward on its own, fast: two ranks as threads of this process (torch's threaded
    group exchanges the tensors, forward and backward), no process started."""
    _check_gradients(run_threaded(_gradients, 2))
