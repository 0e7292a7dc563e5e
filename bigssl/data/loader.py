"""From a ShardStream's micro-batches to fixed-size batches, with position, skips and a timeout.

Workers hand over small collated micro-batches; the loader cuts them into batches of exactly
`batch_size` in the main process. Only samples in a batch the trainer took count as consumed,
so a checkpoint's position never includes samples that were prefetched but not trained on.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import DataLoader

from bigssl.data.position import Consumed
from bigssl.data.stream import ShardStream
from bigssl.errors import UserError


class DataError(UserError):
    """The data stream cannot feed the run."""


class DataStall(DataError):
    """No data arrived within data.timeout_s."""


def _stall_message(stream: ShardStream, timeout_s: float) -> str:
    return (f"data: no samples for {timeout_s:g} s from {stream.shard_set.shards[0].url} and the rest of its "
            f"shards (a pipe: command that hangs, or a stalled file system?); data.timeout_s sets the limit")


@contextmanager
def _deadline(seconds: float, message: str):
    """Raise DataStall if the block runs longer than `seconds` (main thread only; else no limit)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise DataStall(message)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _cat(parts: list[Any]) -> Any:
    if len(parts) == 1:
        return parts[0]  # a micro-batch that is exactly a batch passes through without a copy
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {key: _cat([p[key] for p in parts]) for key in first}
    if _per_sample_strings(first):  # captions: one string per sample
        return [text for part in parts for text in part]
    if isinstance(first, (list, tuple)):
        return type(first)(_cat([p[i] for p in parts]) for i in range(len(first)))
    raise TypeError(f"cannot batch {type(first).__name__}")


def _per_sample_strings(data: Any) -> bool:
    """A collated list of strings (default_collate keeps captions as a list, one per sample)."""
    return isinstance(data, list) and bool(data) and all(isinstance(item, str) for item in data)


def _slice(data: Any, start: int, end: int) -> Any:
    if isinstance(data, torch.Tensor):
        return data[start:end]
    if isinstance(data, dict):
        return {key: _slice(value, start, end) for key, value in data.items()}
    if _per_sample_strings(data):
        return data[start:end]
    if isinstance(data, (list, tuple)):
        return type(data)(_slice(value, start, end) for value in data)
    raise TypeError(f"cannot slice {type(data).__name__}")


class BatchLoader:
    """Iterates batches of exactly `batch_size` samples (a smaller last one only if `keep_tail`)."""

    def __init__(self, stream: ShardStream, batch_size: int, workers: int, timeout_s: float = 0.0,
                 consumed: Consumed | None = None, keep_tail: bool = False, bad: Consumed | None = None) -> None:
        self.stream = stream
        self.batch_size = batch_size
        self.workers = workers
        self.timeout_s = timeout_s
        self.consumed = consumed
        self.bad = bad  # consumed samples that were skipped, for an exact replay after a restart
        self.keep_tail = keep_tail
        self.worker_stats: dict[int, dict[str, int]] = {}

    def skipped(self) -> dict[str, int]:
        """Samples and shards skipped so far by this rank's workers, by reason."""
        total: dict[str, int] = {}
        for stats in self.worker_stats.values():
            for reason, count in stats.items():
                total[reason] = total.get(reason, 0) + count
        return total

    def _micro_batches(self) -> Iterator[dict[str, Any]]:
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.workers,
                            timeout=self.timeout_s if self.workers else 0,
                            prefetch_factor=4 if self.workers else None,
                            pin_memory=torch.cuda.is_available())
        message = _stall_message(self.stream, self.timeout_s)
        iterator = iter(loader)
        while True:
            try:
                with _deadline(self.timeout_s if not self.workers else 0, message):
                    micro = next(iterator)
            except StopIteration:
                return
            except RuntimeError as err:
                if "timed out" in str(err):
                    raise DataStall(message) from err
                raise
            if "fatal" in micro:
                raise DataError(f"data: {micro['fatal']}")
            self.worker_stats[micro["worker"]] = micro["stats"]
            yield micro

    def __iter__(self) -> Iterator[Any]:
        queue: list[tuple[dict[str, Any], int]] = []  # (micro-batch, first unused good sample)
        buffered = 0
        for micro in self._micro_batches():
            if self.consumed is not None:  # skipped samples count as used as soon as they arrive
                bad = ~micro["good"]
                shards, ordinals = micro["shard"][bad].tolist(), micro["ordinal"][bad].tolist()
                self.consumed.mark_all(shards, ordinals)
                if self.bad is not None:
                    self.bad.mark_all(shards, ordinals)
            if micro["data"] is None:
                continue
            micro["good_shard"] = micro["shard"][micro["good"]]
            micro["good_ordinal"] = micro["ordinal"][micro["good"]]
            queue.append((micro, 0))
            buffered += len(micro["good_shard"])
            while buffered >= self.batch_size:
                batch, queue = self._take(queue, self.batch_size)
                buffered -= self.batch_size
                yield batch
        if self.keep_tail and buffered:
            batch, _ = self._take(queue, buffered)
            yield batch

    def _take(self, queue: list, count: int) -> tuple[Any, list]:
        parts, rest = [], []
        needed = count
        for micro, start in queue:
            size = len(micro["good_shard"])
            if needed == 0:
                rest.append((micro, start))
                continue
            end = min(size, start + needed)
            parts.append(_slice(micro["data"], start, end))
            if self.consumed is not None:
                self.consumed.mark_all(micro["good_shard"][start:end].tolist(),
                                       micro["good_ordinal"][start:end].tolist())
            needed -= end - start
            if end < size:
                rest.append((micro, end))
        return _cat(parts), rest
