"""Write samples to WebDataset tar shards plus an index, the one path every dataset takes.

`bigssl shards` (data/build.py: image folder or file list) and the embedded quickstart dataset
both go through `ShardWriter`, so the quickstart exercises the same files a user's ImageNet
run reads.

Layout of OUT:
    shard-000000.tar ...   members `<id>.<ext>` (image bytes), `<id>.cls`, `<id>.txt`
    index.json             written last: shard names, sample counts, first ids, classes
The key of a sample is its global sample id, zero-padded to 9 digits (more digits past a
billion), so memory-bank methods address samples directly: id = shard's first_id + position.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from bigssl.errors import UserError

INDEX_NAME = "index.json"
INDEX_FORMAT = "bigssl-shards/1"


@dataclass
class Sample:
    image: bytes
    ext: str  # "jpg", "png", ...
    label: int | None = None
    text: str | None = None
    converted_from: str | None = None  # the input's format when it was re-encoded (not written)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


class ShardWriter:
    """Rolls over to a new shard at `maxcount` samples or `maxsize` bytes; may continue an
    earlier write (`shards` already done). `on_shard` is called after each shard is closed."""

    def __init__(self, out: Path, maxcount: int, maxsize: int, shards: list[dict] | None = None,
                 on_shard: Callable[[list[dict]], None] | None = None) -> None:
        self.out = Path(out)
        self.maxcount, self.maxsize = maxcount, maxsize
        self.shards: list[dict] = list(shards or [])
        self.total = sum(s["samples"] for s in self.shards)
        self.on_shard = on_shard
        self._writer: wds.TarWriter | None = None
        self._count = self._size = 0

    def write(self, sample: Sample) -> None:
        if self._writer is None or self._count >= self.maxcount or self._size >= self.maxsize:
            self._close_shard()
            # A fixed mtime: the same input gives byte-identical shards, and no pax header per member.
            self._writer = wds.TarWriter(str(self.out / shard_name(len(self.shards))), mtime=0)
        record: dict[str, object] = {"__key__": f"{self.total:09d}", sample.ext: sample.image}
        if sample.label is not None:
            record["cls"] = str(sample.label).encode()
        if sample.text is not None:
            record["txt"] = sample.text.encode()
        self._writer.write(record)
        self._count += 1
        self._size += len(sample.image)
        self.total += 1

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self.shards.append({"name": shard_name(len(self.shards)), "samples": self._count,
                            "first_id": self.total - self._count})
        self._writer, self._count, self._size = None, 0, 0
        if self.on_shard is not None:
            self.on_shard(self.shards)

    def abandon(self) -> None:
        """Close an interrupted write; its unfinished shard is not recorded (a resume rewrites it)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finish(self, classes: list[str], extra: dict | None = None) -> dict:
        """Close the last shard and publish index.json (atomically, last of all)."""
        self._close_shard()
        if self.total == 0:
            raise UserError(f"no samples to write into {self.out}")
        index = {"format": INDEX_FORMAT, "samples": self.total, "classes": classes, "shards": self.shards,
                 **(extra or {})}
        tmp = self.out / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.out / INDEX_NAME)
        return index


def write_shards(samples: Iterable[Sample], out: Path, classes: list[str] | None = None,
                 maxcount: int = 10000, maxsize: int = 1 << 30) -> dict:
    """Write `samples` into a new, empty `out`; returns the index (also saved as index.json).

    Refuses an `out` that already holds shards or an index: two datasets never mix silently.
    """
    out = Path(out)
    if out.exists() and (any(out.glob("*.tar")) or (out / INDEX_NAME).exists()):
        raise UserError(f"{out} already contains shards; choose an empty output directory")
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, maxcount, maxsize)
    for sample in samples:
        writer.write(sample)
    return writer.finish(classes or [])
