"""The embedded quickstart dataset: a balanced Fashion-MNIST subset shipped in the package.

`quickstart:train` (10,000 images, 1,000 per class, from the official training split) and
`quickstart:val` (2,000, from the official test split) are written to tar shards by
`write_shards` on first use, so the quickstart reads the same kind of files as any other run.
`quickstart:captions` is the training split as image–text pairs for CLIP: each image with a
caption made from its class name ("a black and white photo of the sneaker."). `quickstart:
colour-train` and `quickstart:colour-val` are the two splits read through a fixed colour map,
for CMC: in a grey image the ab channels of Lab are zero and carry nothing to contrast with L.
Licence: FASHION_MNIST_LICENSE.txt beside the data file (MIT, Zalando SE).
"""

from __future__ import annotations

import fcntl
import io
import lzma
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from bigssl.data.write import INDEX_NAME, Sample, write_shards
from bigssl.errors import UserError

SCHEME = "quickstart:"
SPLITS = ("train", "val", "captions", "colour-train", "colour-val")
DATA_FILE = Path(__file__).with_name("fashion_mnist_subset.npz.xz")
SHARD_SIZE = 1000  # 10 training shards: enough for 2 ranks × several workers
VERSION = "fmnist-v2"  # v2: shards without per-member pax headers


def cache_root() -> Path:
    """Where the shards are written: $BIGSSL_CACHE, else ~/.cache/bigssl."""
    root = os.environ.get("BIGSSL_CACHE") or Path.home() / ".cache" / "bigssl"
    return Path(root) / "quickstart" / VERSION


def load_arrays() -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(lzma.decompress(DATA_FILE.read_bytes()))) as data:
        return {name: data[name] for name in data.files}


def _png_samples(images: np.ndarray, labels: np.ndarray) -> Iterator[Sample]:
    for image, label in zip(images, labels, strict=True):
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="PNG")
        yield Sample(buffer.getvalue(), "png", int(label))


def colour_map(grey: np.ndarray) -> np.ndarray:
    """uint8 grey [H, W] → uint8 RGB [H, W, 3]: dark blue through green to light yellow, so that
    lightness and chroma (L and ab) both follow the grey level (a fixed map, no randomness)."""
    v = grey.astype(np.float32) / 255
    rgb = np.stack([v**0.5, v, 0.85 * (1 - v) + 0.15 * v], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def _colour_samples(images: np.ndarray, labels: np.ndarray) -> Iterator[Sample]:
    for image, label in zip(images, labels, strict=True):
        buffer = io.BytesIO()
        Image.fromarray(colour_map(image), mode="RGB").save(buffer, format="PNG")
        yield Sample(buffer.getvalue(), "png", int(label))


CAPTION_TEMPLATES = ("a photo of the {}.", "a black and white photo of the {}.", "a small picture of the {}.",
                     "the {} on a plain background.", "a low resolution photo of the {}.", "a grey image of the {}.",
                     "a cropped photo of the {}.", "a centred photo of the {}.")


def readable(class_name: str) -> str:
    """A class name as words ('t-shirt/top' → 't-shirt or top')."""
    return class_name.replace("/", " or ")


def caption(class_name: str, index: int) -> str:
    """The caption of training image `index`: a template chosen by the index, the class name."""
    return CAPTION_TEMPLATES[(index * 5 + 3) % len(CAPTION_TEMPLATES)].format(readable(class_name))


def _captioned_samples(images: np.ndarray, labels: np.ndarray, classes: list[str]) -> Iterator[Sample]:
    for index, sample in enumerate(_png_samples(images, labels)):
        yield Sample(sample.image, sample.ext, sample.label, caption(classes[sample.label], index))


def materialize(split: str) -> Path:
    """Write the split's shards once (safe when several ranks start at the same time)."""
    if split not in SPLITS:
        raise UserError(f"unknown quickstart split {split!r}; use one of "
                        f"{', '.join('quickstart:' + name for name in SPLITS)}")
    target = cache_root() / split
    if (target / INDEX_NAME).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first process writes; the others wait, then reuse
        if not (target / INDEX_NAME).exists():
            started = time.perf_counter()
            print(f"bigssl: writing quickstart:{split} to shards in {target} (first use only)…", file=sys.stderr,
                  flush=True)
            arrays = load_arrays()
            staging = target.with_name(f".{split}.partial-{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            classes = [str(c) for c in arrays["classes"]]
            if split == "captions":
                samples = _captioned_samples(arrays["train_images"], arrays["train_labels"], classes)
            elif split.startswith("colour-"):
                source = split.removeprefix("colour-")
                samples = _colour_samples(arrays[f"{source}_images"], arrays[f"{source}_labels"])
            else:
                samples = _png_samples(arrays[f"{split}_images"], arrays[f"{split}_labels"])
            write_shards(samples, staging, classes, maxcount=SHARD_SIZE)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
            print(f"bigssl: wrote quickstart:{split} ({time.perf_counter() - started:.0f} s)", file=sys.stderr,
                  flush=True)
    return target


def pattern(spec: str) -> str:
    """'quickstart:train' → a brace pattern over the split's shards (written if needed)."""
    directory = materialize(spec[len(SCHEME):])
    count = len(list(directory.glob("shard-*.tar")))
    return str(directory / f"shard-{{000000..{count - 1:06d}}}.tar")
