"""Regenerate bigssl's embedded quickstart dataset from Debian's Fashion-MNIST files.

    apt-get install dataset-fashion-mnist
    python tools/make_quickstart_subset.py [--source /usr/share/datasets/fashion-mnist]

Takes the first N images of each class, in file order, from the official training split
(pretraining pool) and from the official test split (held-out set for kNN), so the subset is
balanced and reproducible bit for bit. Writes bigssl/data/fashion_mnist_subset.npz.xz.
"""

from __future__ import annotations

import argparse
import gzip
import io
import lzma
import struct
from pathlib import Path

import numpy as np

CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
OUT = Path(__file__).resolve().parents[1] / "bigssl" / "data" / "fashion_mnist_subset.npz.xz"


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (the MNIST container: big-endian magic, dims, then raw uint8)."""
    raw = gzip.decompress(path.read_bytes())
    _, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if dtype_code != 0x08:
        raise ValueError(f"{path}: expected uint8 IDX data, got type code {dtype_code:#x}")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def balanced_subset(images: np.ndarray, labels: np.ndarray, per_class: int):
    picks = [np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASSES))]
    order = np.sort(np.concatenate(picks))  # keep file order so classes stay interleaved
    return images[order], labels[order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--val-per-class", type=int, default=200)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    train_x, train_y = balanced_subset(
        read_idx(args.source / "train-images-idx3-ubyte.gz"),
        read_idx(args.source / "train-labels-idx1-ubyte.gz"),
        args.train_per_class,
    )
    val_x, val_y = balanced_subset(
        read_idx(args.source / "t10k-images-idx3-ubyte.gz"),
        read_idx(args.source / "t10k-labels-idx1-ubyte.gz"),
        args.val_per_class,
    )
    buffer = io.BytesIO()
    np.savez(buffer, train_images=train_x, train_labels=train_y,
             val_images=val_x, val_labels=val_y, classes=np.array(CLASSES))
    args.out.write_bytes(lzma.compress(buffer.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): "
          f"{len(train_x)} train, {len(val_x)} val images")


if __name__ == "__main__":
    main()
