"""The sample stream of one rank: shards split by rank then by DataLoader worker, read
front to back a few at a time, shuffled, decoded, and handed out as small collated batches.

Modes
- resampled: every (rank, worker) draws shards with replacement, forever (sources picked by
  `data.weights`); the trainer decides where an epoch ends.
- exact: the epoch's shards, shuffled by (seed, epoch), are dealt to ranks and then to
  workers so that sample counts balance; every sample is read once per epoch over all ranks
  and workers, minus what `Consumed` says was already used before a restart.

Each worker interleaves `interleave` open shards and passes samples through a shuffle buffer
of `shuffle_buffer` samples, all seeded by (seed, epoch, rank, worker). Bad samples (see
`decode.BadSample`) and unreadable shards are skipped and counted by reason; every
micro-batch carries the worker's counters and the (shard, ordinal) of each sample, good or
bad, so the loader can track the position and report the skips.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info
from webdataset.gopen import gopen

from bigssl import preemption
from bigssl.data import tar
from bigssl.data.decode import BadSample
from bigssl.data.position import Consumed
from bigssl.data.shards import ShardSet
from bigssl.errors import ConfigError


@dataclass(frozen=True)
class StreamSpec:
    mode: str = "resampled"  # resampled | exact
    seed: int = 0
    epoch: int = 0
    rank: int = 0
    world_size: int = 1
    interleave: int = 4
    shuffle_buffer: int = 1000
    micro_batch: int = 32


def deal(shard_set: ShardSet, spec: StreamSpec, workers: int,
         consumed: Consumed | None = None) -> list[list[list[int]]]:
    """Exact mode: shard indices for each [rank][worker], balanced by samples still to read.

    Shards go in a (seed, epoch) shuffled order, each to the least-loaded rank, then within a
    rank to its least-loaded worker; every rank computes the same deal. Without an index,
    every shard counts as one unit of load.
    """
    order = list(range(len(shard_set.shards)))
    random.Random(f"{spec.seed}/{spec.epoch}/order").shuffle(order)
    left = {i: (shard_set.shards[i].samples or 1) - (consumed.count(i) if consumed else 0) for i in order}
    ranks: list[list[int]] = [[] for _ in range(spec.world_size)]
    rank_load = [0] * spec.world_size
    for shard in order:
        if left[shard] <= 0:
            continue
        target = min(range(spec.world_size), key=lambda r: (rank_load[r], r))
        ranks[target].append(shard)
        rank_load[target] += left[shard]
    result = []
    for shards in ranks:
        per_worker: list[list[int]] = [[] for _ in range(workers)]
        worker_load = [0] * workers
        for shard in shards:
            target = min(range(workers), key=lambda w: (worker_load[w], w))
            per_worker[target].append(shard)
            worker_load[target] += left[shard]
        result.append(per_worker)
    return result


def check_exact_split(shard_set: ShardSet, world_size: int, workers: int) -> None:
    needed = world_size * max(1, workers)
    if len(shard_set.shards) < needed:
        raise ConfigError(
            f"data.mode=exact: {len(shard_set.shards)} shards cannot feed {world_size} ranks × {max(1, workers)} "
            f"workers; it needs at least {needed} shards (write smaller shards or lower data.workers)")


def samples_per_rank(shard_set: ShardSet, spec: StreamSpec, workers: int, consumed: Consumed | None) -> list[int]:
    """Samples each rank will read this epoch in exact mode."""
    dealt = deal(shard_set, spec, workers, consumed)
    return [sum(shard_set.shards[s].samples - (consumed.count(s) if consumed else 0)
                for worker in rank for s in worker) for rank in dealt]


PIPE_EXIT_GRACE_S = 1.0  # a command whose output ended badly usually exits right after


class NoData(Exception):
    """The stream cannot produce samples at all."""


def _close(stream, finished: bool, failed: bool) -> int | None:
    """Close a shard stream. Returns the exit status of a `pipe:` command that failed by itself
    (non-zero, or minus the signal that killed it); None for files, for commands that exited 0
    and for one left mid-stream (a timeout, an early stop), which is killed here first, since
    closing waits for it to exit. After a read error (`failed`: output cut short, or none) the
    command is given a moment to exit by itself, so that its own status is the one reported."""
    if stream is None:
        return None
    process = getattr(stream, "proc", None)
    if process is not None and failed:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(PIPE_EXIT_GRACE_S)
    killed = process is not None and not finished and process.poll() is None
    if killed:
        process.kill()
        process.wait()
        stream.ignore_errors = True
    # webdataset raises for a failed command here, and only polls while reading, so most failures
    # surface only now: the status is taken from the process below instead.
    with contextlib.suppress(OSError):
        stream.close()
    if process is None or killed:
        return None
    status = process.returncode if process.returncode is not None else process.wait()
    return status or None


def _pipe_failed(url: str, status: int, read: int) -> str:
    how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
    return f"shard {url}: the command {how} after {read} samples"


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class ShardStream(IterableDataset):
    """Yields micro-batches: {"data": collated transform outputs | None, "shard", "ordinal",
    "good" (per sample: decoded or skipped), "stats" (this worker's skip counters), "worker"}."""

    def __init__(self, shard_set: ShardSet, transform: Callable[..., dict[str, Any]], spec: StreamSpec,
                 consumed: Consumed | None = None, *, replay_bad: Consumed | None = None,
                 seed_samples: bool = False) -> None:
        """`consumed`: samples of this epoch already used. By default they are left out of the
        deal and the reading, so a restart reads only the rest (at any world size). With
        `replay_bad` (which of them were bad samples), the epoch is read exactly as from its
        start and the consumed samples are passed over in place, so the micro-batches (hence the
        batches) that follow are the ones an uninterrupted run would have made; it needs the
        same ranks, workers and batch sizes. `seed_samples`: the transform is called as
        transform(sample, rng) with a generator seeded by (seed, epoch, shard, ordinal), so a
        sample's views do not depend on what its worker read before."""
        super().__init__()
        self.shard_set = shard_set
        self.transform = transform
        self.spec = spec
        self.consumed = consumed
        self.replay_bad = replay_bad
        self.seed_samples = seed_samples

    # ------------------------------------------------------------------ shard selection
    def _resampled(self, rng: random.Random) -> Iterator[int]:
        by_source: dict[int, list[int]] = {}
        for index, shard in enumerate(self.shard_set.shards):
            by_source.setdefault(shard.source, []).append(index)
        sources = sorted(by_source)
        # Weights are per sample: a source of larger shards is drawn less often.
        mean_size = {s: sum(self.shard_set.shards[i].samples or 1 for i in by_source[s]) / len(by_source[s])
                     for s in sources}
        weights = [self.shard_set.weights[s] / mean_size[s] for s in sources]
        while True:
            source = rng.choices(sources, weights)[0]
            yield rng.choice(by_source[source])

    def _shards(self, worker: int, workers: int, rng: random.Random) -> Iterator[int]:
        if self.spec.mode == "resampled":
            return self._resampled(rng)
        left_out = None if self.replay_bad is not None else self.consumed
        return iter(deal(self.shard_set, self.spec, workers, left_out)[self.spec.rank][worker])

    # --------------------------------------------------------------------------- reading
    def _read(self, shard: int, stats: Counter) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(shard, ordinal, raw sample) for the samples of one shard not yet consumed."""
        url = self.shard_set.shards[shard].url
        expected = self.shard_set.shards[shard].samples

        def shard_error(message: str) -> None:
            stats["shard_error"] += 1
            if stats["shard_error"] <= 3:
                print(f"bigssl: {message}", file=sys.stderr, flush=True)

        read = 0
        finished = False
        failure: Exception | None = None
        stream = None
        try:
            stream = gopen(url, "rb")
            for ordinal, sample in enumerate(tar.samples(stream)):
                read = ordinal + 1
                if self.replay_bad is None and self.consumed is not None and self.consumed.contains(shard, ordinal):
                    continue
                yield shard, ordinal, sample
            finished = True
        except (OSError, ValueError, EOFError) as err:  # tar.TarFormatError is a ValueError
            failure = err
        finally:  # (also when the consumer stops early; nothing below runs then)
            status = _close(stream, finished, failure is not None)
        # One shard_error per shard: a failed command's status says more than the read error it
        # caused (webdataset's "exit 1 (read)", or a tar cut short).
        if status is not None:
            shard_error(_pipe_failed(url, status, read))
            return
        if failure is not None:
            shard_error(f"skipping the rest of unreadable shard {url}: {failure}")
            return
        # A shard cut at a member boundary looks complete; the index tells it apart.
        if expected is not None and read < expected:
            shard_error(f"shard {url} ended after {read} of its {expected} samples (truncated?)")

    def _interleaved(self, rng: random.Random, shards: Iterator[int], stats: Counter):
        open_readers: list[list] = []  # [reader, samples it gave]
        barren = 0  # shards in a row that gave nothing
        limit = max(8, 2 * len(self.shard_set.shards))
        while True:
            while len(open_readers) < self.spec.interleave:
                shard = next(shards, None)
                if shard is None:
                    break
                open_readers.append([self._read(shard, stats), 0])
            if not open_readers:
                return
            slot = rng.randrange(len(open_readers))
            item = next(open_readers[slot][0], None)
            if item is None:
                barren = barren + 1 if open_readers.pop(slot)[1] == 0 else 0
                if barren >= limit:  # a resampled stream would otherwise spin on bad shards forever
                    raise NoData(f"{barren} shards in a row gave no sample ({dict(stats)}); is data.train "
                                 f"readable? first shard: {self.shard_set.shards[0].url}")
                continue
            open_readers[slot][1] += 1
            yield item

    def _shuffled(self, items: Iterator, rng: random.Random) -> Iterator:
        if self.spec.shuffle_buffer <= 1:
            yield from items
            return
        buffer: list = []
        for item in items:
            if len(buffer) < self.spec.shuffle_buffer:
                buffer.append(item)
                continue
            slot = rng.randrange(len(buffer))
            yield buffer[slot]
            buffer[slot] = item
        rng.shuffle(buffer)
        yield from buffer

    # ------------------------------------------------------------------------ batching
    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = _worker()
        spec = self.spec
        rng = random.Random(f"{spec.seed}/{spec.epoch}/{spec.rank}/{worker}")
        if get_worker_info() is not None:
            # Augmentations draw from the worker's generators: seed them from the same
            # (seed, epoch, rank, worker). In-process iteration keeps the caller's generator.
            torch.manual_seed(rng.getrandbits(63))
            random.seed(rng.getrandbits(63))  # for transforms not seeded per sample
            preemption.ignore_in_worker()  # stop signals are the main process's to handle
        stats: Counter = Counter()
        items = self._shuffled(self._interleaved(rng, self._shards(worker, workers, rng), stats), rng)
        try:
            yield from self._batches(items, stats, worker)
        except NoData as err:
            # Handed over as data: an exception raised in a DataLoader worker reaches the main
            # process wrapped in a traceback, and the user deserves the one line.
            yield {"fatal": str(err), "worker": worker, "stats": dict(stats)}

    def _batches(self, items: Iterator, stats: Counter, worker: int) -> Iterator[dict[str, Any]]:
        spec = self.spec
        pending: list[tuple[int, int, dict[str, Any] | None]] = []
        good = 0  # good samples in the micro-batch, including ones passed over in a replay
        reported: dict[str, int] = {}  # the counters the last micro-batch carried
        for shard, ordinal, sample in items:
            if self.replay_bad is not None and self.consumed.contains(shard, ordinal):
                # Used before the restart: not decoded again, but a good one still takes its
                # place in the micro-batch, so the boundaries (and the DataLoader's round-robin
                # over workers) stay those of the uninterrupted epoch. Its skip was counted then.
                good += not self.replay_bad.contains(shard, ordinal)
            else:
                try:
                    if self.seed_samples:
                        out = self.transform(sample, random.Random(f"{spec.seed}/{spec.epoch}/{shard}/{ordinal}"))
                    else:
                        out = self.transform(sample)
                    first_id = self.shard_set.shards[shard].first_id
                    out["id"] = -1 if first_id is None else first_id + ordinal
                    good += 1
                except BadSample as bad:
                    stats[bad.reason] += 1
                    out = None
                pending.append((shard, ordinal, out))
            if good == spec.micro_batch:
                yield self._collate(pending, stats, worker)
                pending, good, reported = [], 0, dict(stats)
        # Counters travel with micro-batches: shards that failed after the last one (or a worker
        # whose every shard failed) are reported by a last, possibly empty, one. (The non-empty
        # micro-batches, and so the batches, stay those of a run without it.)
        if pending or good or dict(stats) != reported:
            yield self._collate(pending, stats, worker)

    @staticmethod
    def _collate(pending: list, stats: Counter, worker: int) -> dict[str, Any]:
        outputs = [out for _, _, out in pending if out is not None]
        return {  # `data` is None when nothing in it needs training on (all bad, or all replayed)
            "data": default_collate(outputs) if outputs else None,
            "shard": torch.tensor([s for s, _, _ in pending], dtype=torch.long),
            "ordinal": torch.tensor([o for _, o, _ in pending], dtype=torch.long),
            "good": torch.tensor([out is not None for _, _, out in pending], dtype=torch.bool),
            "stats": dict(stats),
            "worker": worker,
        }
