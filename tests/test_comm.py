from pathlib import Path

import pytest
import torch
from helpers import run_distributed


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


def test_the_per_step_vote_is_the_same_on_every_rank(tmp_path: Path):
    run_distributed(_vote, 2, str(tmp_path))
    expected = {"all fine": (True, False), "nan on rank 1": (False, False), "signal on rank 1": (True, True),
                "both": (False, True)}
    for rank in range(2):
        assert torch.load(tmp_path / f"{rank}.pt", weights_only=False) == expected
