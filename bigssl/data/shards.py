"""Read WebDataset tar shards: resolve patterns, split by rank and worker, shuffle, decode.

Two modes:
- resampled (training): every (rank, worker) draws shards with replacement, forever, from its
  own seeded generator; the trainer decides where an epoch ends.
- exact (evaluation): rank r reads shards r, r+W, ...; its workers split those again; every
  sample is read exactly once over all ranks and workers.
Seeds derive from (seed, epoch, rank, worker), so a run is reproducible.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bigssl.data import quickstart
from bigssl.data.write import INDEX_NAME
from bigssl.errors import UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")


def resolve(pattern: str, key: str = "data.train") -> list[str]:
    """A pattern (brace notation, several joined by '::', or quickstart:<split>) → shard URLs.

    Local shards must exist; `pipe:` URLs are passed through untouched.
    """
    if pattern.startswith(quickstart.SCHEME):
        try:
            pattern = quickstart.pattern(pattern)
        except UserError as err:
            raise UserError(f"{key}: {err}") from err
    urls = [url for part in pattern.split("::") if part for url in braceexpand.braceexpand(part)]
    if not urls:
        raise UserError(f"{key}: pattern {pattern!r} matches no shards")
    missing = [url for url in urls if not (url.startswith("pipe:") or "://" in url or Path(url).is_file())]
    if missing:
        raise UserError(f"{key}: shard not found: {missing[0]} ({len(missing)} of {len(urls)} missing)")
    return urls


def sample_count(urls: list[str]) -> int | None:
    """Samples in these shards, from the index.json beside them (None when unknown)."""
    by_dir: dict[Path, set[str]] = {}
    for url in urls:
        if url.startswith("pipe:") or "://" in url:
            return None
        by_dir.setdefault(Path(url).parent, set()).add(Path(url).name)
    total = 0
    for directory, names in by_dir.items():
        index_path = directory / INDEX_NAME
        if not index_path.is_file():
            return None
        counts = {s["name"]: s["samples"] for s in json.loads(index_path.read_text())["shards"]}
        if not names <= counts.keys():
            return None
        total += sum(counts[n] for n in names)
    return total


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def decode_image(sample: dict[str, Any]) -> Image.Image:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            with Image.open(io.BytesIO(sample[ext])) as image:
                return image.convert("RGB")
    raise ValueError(f"sample {sample.get('__key__')} has no image member")


def decode_label(sample: dict[str, Any]) -> int:
    return int(sample["cls"]) if "cls" in sample else -1


@dataclass
class StreamPosition:
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    epoch: int = 0


class ShardStream(IterableDataset):
    """Yields `transform(sample)` for the samples of this rank and DataLoader worker."""

    def __init__(self, urls: list[str], transform: Callable[[dict[str, Any]], Any], position: StreamPosition,
                 resampled: bool, shuffle_buffer: int = 0) -> None:
        super().__init__()
        self.urls = urls
        self.transform = transform
        self.position = position
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer

    def _rng(self, worker: int) -> random.Random:
        p = self.position
        return random.Random(f"{p.seed}/{p.epoch}/{p.rank}/{worker}")

    def _shards(self, worker: int, workers: int, rng: random.Random) -> Iterator[dict[str, str]]:
        if self.resampled:
            while True:
                yield {"url": rng.choice(self.urls)}
        mine = self.urls[self.position.rank :: self.position.world_size][worker::workers]
        for url in mine:
            yield {"url": url}

    def _shuffled(self, samples: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        buffer: list[dict[str, Any]] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            slot = rng.randrange(len(buffer))
            yield buffer[slot]
            buffer[slot] = sample
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[Any]:
        worker, workers = _worker()
        rng = self._rng(worker)
        if get_worker_info() is not None:
            # Augmentations draw from the worker's torch generator: seed it from the same
            # (seed, epoch, rank, worker). In-process iteration keeps the caller's generator.
            torch.manual_seed(rng.getrandbits(63))
        samples = wds.tarfile_to_samples(handler=wds.warn_and_continue)(self._shards(worker, workers, rng))
        for sample in self._shuffled(samples, rng):
            yield self.transform(sample)


def loader(stream: ShardStream, batch_size: int, workers: int, drop_last: bool) -> DataLoader:
    return DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
