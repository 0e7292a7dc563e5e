"""The shard stream: resolution, exact and resampled epochs, rank × worker splits, positions."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from datasets import make_shards, pattern

from bigssl.data.loader import BatchLoader
from bigssl.data.position import Consumed
from bigssl.data.shards import resolve
from bigssl.data.stream import ShardStream, StreamSpec, check_exact_split, samples_per_rank
from bigssl.errors import ConfigError, UserError


def ids_and_labels(sample: dict) -> dict:
    return {"key": int(sample["__key__"]), "label": int(sample["cls"])}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("stream") / "ds", 230, 23)  # 10 shards


def keys(batches) -> list[int]:
    return [k for batch in batches for k in batch["key"].tolist()]


def test_resolve_knows_counts_ids_and_errors(shard_dir: Path, tmp_path: Path):
    shards = resolve(pattern(shard_dir, 10))
    assert shards.total == 230 and shards.counted
    assert [s.first_id for s in shards.shards[:3]] == [0, 23, 46]
    with pytest.raises(UserError, match=r"shard-000010.tar \(2 of 12 missing\)"):
        resolve(pattern(shard_dir, 12), "data.train")
    with pytest.raises(UserError, match="data.val"):
        resolve(str(shard_dir / "nothing-{5..4}.tar"), "data.val")
    other = make_shards(tmp_path / "other", 10, 5)
    mixed = resolve(f"{pattern(shard_dir, 10)}::{pattern(other, 2)}", weights=[3, 1])
    assert [s.source for s in mixed.shards] == [0] * 10 + [1] * 2
    assert [s.first_id for s in mixed.shards[10:]] == [230, 235]  # ids of a second source follow the first
    with pytest.raises(ConfigError, match="data.weights"):
        resolve(f"{pattern(shard_dir, 10)}::{pattern(other, 2)}", weights=[1])


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 2), (3, 1)])
def test_exact_epoch_is_disjoint_and_complete_over_ranks_and_workers(shard_dir: Path, world: int, workers: int):
    shards = resolve(pattern(shard_dir, 10))
    seen: list[int] = []
    for rank in range(world):
        spec = StreamSpec(mode="exact", seed=1, epoch=0, rank=rank, world_size=world, shuffle_buffer=16, micro_batch=4)
        loader = BatchLoader(ShardStream(shards, ids_and_labels, spec), batch_size=5, workers=workers, keep_tail=True)
        for batch in loader:
            assert (batch["label"] == batch["key"] % 3).all() and (batch["id"] == batch["key"]).all()
            seen += batch["key"].tolist()
    assert sorted(seen) == list(range(230))


def test_exact_epoch_order_is_seeded_and_changes_with_the_epoch(shard_dir: Path):
    shards = resolve(pattern(shard_dir, 10))

    def order(seed: int, epoch: int) -> list[int]:
        spec = StreamSpec(mode="exact", seed=seed, epoch=epoch, rank=0, world_size=2, shuffle_buffer=16)
        return keys(BatchLoader(ShardStream(shards, ids_and_labels, spec), batch_size=8, workers=2, keep_tail=True))

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert order(0, 0) != sorted(order(0, 0))  # shuffled, not file order


def test_exact_mode_needs_enough_shards(shard_dir: Path):
    shards = resolve(pattern(shard_dir, 10))
    check_exact_split(shards, world_size=2, workers=5)
    with pytest.raises(ConfigError, match="needs at least 12 shards"):
        check_exact_split(shards, world_size=3, workers=4)


def test_ranks_get_balanced_sample_counts(tmp_path: Path):
    shards = resolve(pattern(make_shards(tmp_path / "ds", 103, 10), 11))  # ten of 10, one of 3
    counts = samples_per_rank(shards, StreamSpec(mode="exact", world_size=4), workers=1, consumed=None)
    assert sum(counts) == 103 and max(counts) - min(counts) <= 10


def test_resampled_stream_mixes_sources_by_weight(shard_dir: Path, tmp_path: Path):
    other = make_shards(tmp_path / "other", 40, 4)  # smaller shards: weights are per sample, not per shard
    shards = resolve(f"{pattern(shard_dir, 10)}::{pattern(other, 10)}", weights=[3, 1])
    spec = StreamSpec(mode="resampled", seed=0, shuffle_buffer=0)
    taken = Counter()
    for micro in ShardStream(shards, ids_and_labels, spec):
        taken.update("second" if i >= 230 else "first" for i in micro["data"]["id"].tolist())
        if taken.total() >= 8000:
            break
    assert 0.70 < taken["first"] / taken.total() < 0.80  # 3 : 1


def test_resampled_stream_is_seeded_per_rank_epoch_and_restart(shard_dir: Path):
    shards = resolve(pattern(shard_dir, 10))

    def first(**spec_args) -> list[int]:
        stream = ShardStream(shards, ids_and_labels, StreamSpec(mode="resampled", shuffle_buffer=8, **spec_args))
        return next(iter(stream))["data"]["key"].tolist()

    assert first(rank=0) == first(rank=0)
    assert first(rank=0, world_size=2) != first(rank=1, world_size=2)
    assert first(epoch=0) != first(epoch=1)
    assert first(seed=0) != first(seed=7)


@pytest.mark.parametrize(("world_before", "world_after", "workers"), [(2, 2, 2), (2, 1, 0), (1, 3, 1)])
def test_resume_mid_epoch_delivers_the_rest_once(shard_dir: Path, world_before: int, world_after: int,
                                                 workers: int):
    """Interrupt an exact epoch, resume from the merged position, possibly at another world size."""
    shards = resolve(pattern(shard_dir, 10))
    merged = Consumed()
    first_part: list[int] = []
    for rank in range(world_before):
        consumed = Consumed()
        spec = StreamSpec(mode="exact", seed=3, rank=rank, world_size=world_before, shuffle_buffer=12, micro_batch=4)
        loader = iter(BatchLoader(ShardStream(shards, ids_and_labels, spec), 6, workers, consumed=consumed))
        for _ in range(7):  # 7 batches per rank, then the job dies (prefetched samples are lost)
            first_part += next(loader)["key"].tolist()
        del loader
        assert sum(consumed.count(s) for s in range(10)) == 42
        merged.merge(Consumed.from_state(consumed.state_dict()))  # through the checkpoint format
    rest: list[int] = []
    for rank in range(world_after):
        spec = StreamSpec(mode="exact", seed=3, rank=rank, world_size=world_after, shuffle_buffer=12, micro_batch=4)
        stream = ShardStream(shards, ids_and_labels, spec, consumed=merged)
        rest += keys(BatchLoader(stream, 6, workers, keep_tail=True))
    assert len(first_part) == 42 * world_before
    assert sorted(first_part + rest) == list(range(230))


def test_position_prefix_and_beyond():
    consumed = Consumed()
    for ordinal in [0, 1, 3, 4, 7]:
        consumed.mark(5, ordinal)
    assert consumed.prefix[5] == 2 and consumed.beyond[5] == {3, 4, 7}
    consumed.mark(5, 2)
    assert consumed.prefix[5] == 5 and consumed.beyond[5] == {7}
    assert consumed.contains(5, 4) and consumed.contains(5, 7) and not consumed.contains(5, 6)
    assert consumed.count(5) == 6
    assert Consumed.from_state(consumed.state_dict()) == consumed


def test_batches_are_exactly_the_requested_size(shard_dir: Path):
    shards = resolve(pattern(shard_dir, 10))
    spec = StreamSpec(mode="exact", shuffle_buffer=0, micro_batch=7)
    sizes = [len(b["key"]) for b in BatchLoader(ShardStream(shards, ids_and_labels, spec), 10, 2)]
    assert sizes == [10] * 23  # 230 samples, micro-batches of 7 cut into batches of 10
    with_tail = [len(b["key"]) for b in BatchLoader(ShardStream(shards, ids_and_labels, spec), 40, 2, keep_tail=True)]
    assert with_tail == [40] * 5 + [30]
    assert isinstance(next(iter(BatchLoader(ShardStream(shards, ids_and_labels, spec), 4, 0)))["key"], torch.Tensor)
