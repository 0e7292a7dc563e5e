"""Small shard sets built inside tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from bigssl.data.write import Sample, write_shards


def encoded(value: int, size: int = 8, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value % 256, dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def make_shards(directory: Path, count: int, per_shard: int, classes: int = 3) -> Path:
    """`count` PNG samples; sample i has label i % classes and pixel value i % 256."""
    samples = (Sample(encoded(i), "png", i % classes) for i in range(count))
    write_shards(samples, directory, classes=[f"c{c}" for c in range(classes)], maxcount=per_shard)
    return directory


def pattern(directory: Path, shards: int) -> str:
    return str(directory / f"shard-{{000000..{shards - 1:06d}}}.tar")
