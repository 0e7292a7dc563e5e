"""Loading throughput: bigssl's shard path against torchvision ImageFolder + PIL, same images.

    pip install scikit-image   # its bundled photos are the raw material
    python tools/bench_loader.py [--images 2000] [--workers 2] [--json]

Builds ImageNet-like JPEGs (random crops of scikit-image's bundled photos resized to 500×375,
quality 90), writes the same bytes once as an ImageFolder tree and once as bigssl shards, then
times, in this one process and on the same cores:
  baseline  ImageFolder + PIL decode + RandomResizedCrop(224) + PILToTensor, DataLoader
  bigssl    shards + simplejpeg decode + RandomResizedCrop(224) on the uint8 tensor, BatchLoader
and the single-thread decode-only ceilings of PIL and simplejpeg. Prints images/s and the
ratio bigssl / baseline; with --json the last line is a JSON object with every number.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import simplejpeg
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from bigssl.data.decode import decode_rgb, image_bytes
from bigssl.data.loader import BatchLoader
from bigssl.data.shards import resolve
from bigssl.data.stream import ShardStream, StreamSpec
from bigssl.data.write import Sample, write_shards

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cat")
SIZE = (500, 375)


def make_images(count: int, seed: int = 0) -> list[bytes]:
    try:
        import skimage.data
    except ImportError as err:
        raise SystemExit("bench_loader needs scikit-image for its bundled photos: pip install scikit-image") from err
    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        scale = rng.uniform(0.5, 1.0)
        w = int(min(photo.width, photo.height * 4 / 3) * scale)
        h = int(w * 3 / 4)
        x, y = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
        image = photo.crop((x, y, x + w, y + h)).resize(SIZE, Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


class TensorCrop:
    """The bigssl path: raw sample → simplejpeg → uint8 tensor → RandomResizedCrop(224)."""

    def __init__(self, fast_decode: bool) -> None:
        self.crop = T.RandomResizedCrop(224, antialias=True)
        self.fast_decode = fast_decode

    def __call__(self, sample: dict) -> dict:
        return {"image": self.crop(decode_rgb(image_bytes(sample), self.fast_decode))}


def time_pass(batches) -> float:
    start, count = time.perf_counter(), 0
    for batch in batches:
        count += len(batch["image"] if isinstance(batch, dict) else batch[0])
    return count / (time.perf_counter() - start)


def decode_rates(images: list[bytes]) -> dict[str, float]:
    def rate(decode) -> float:
        start = time.perf_counter()
        for data in images:
            decode(data)
        return len(images) / (time.perf_counter() - start)

    def pil(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))

    def fast(data: bytes) -> np.ndarray:
        return simplejpeg.decode_jpeg(data, fastdct=True, fastupsample=True)

    return {"decode_pil_per_core": rate(pil), "decode_simplejpeg_per_core": rate(simplejpeg.decode_jpeg),
            "decode_simplejpeg_fast_per_core": rate(fast)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of every number")
    args = parser.parse_args()
    torch.set_num_threads(1)  # each loader worker is one core; the main process only collects

    root = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        images = make_images(args.images)
        folder = root / "folder" / "photos"
        folder.mkdir(parents=True)
        for i, data in enumerate(images):
            (folder / f"{i:06d}.jpg").write_bytes(data)
        write_shards((Sample(data, "jpg", 0) for data in images), root / "shards", classes=["photos"], maxcount=250)
        last = (args.images - 1) // 250
        shards = resolve(str(root / "shards" / f"shard-{{000000..{last:06d}}}.tar"))

        baseline_set = ImageFolder(str(root / "folder"),
                                   transform=T.Compose([T.RandomResizedCrop(224, antialias=True), T.PILToTensor()]))

        def baseline() -> float:
            return time_pass(DataLoader(baseline_set, batch_size=args.batch, shuffle=True, num_workers=args.workers))

        def ours(fast_decode: bool) -> float:
            # The training defaults: micro-batches of one batch, data.fast_decode on or off.
            spec = StreamSpec(mode="exact", shuffle_buffer=256, micro_batch=args.batch)
            return time_pass(BatchLoader(ShardStream(shards, TensorCrop(fast_decode), spec), args.batch,
                                         args.workers, keep_tail=True))

        baseline(), ours(True)  # warm the page cache and the worker start-up paths
        rates: dict[str, list[float]] = {"baseline": [], "fast": [], "exact": []}
        for _ in range(args.repeats):  # interleaved, so drift hits all alike
            rates["baseline"].append(baseline())
            rates["fast"].append(ours(True))
            rates["exact"].append(ours(False))
        result = {"images": args.images, "workers": args.workers, "image_size": list(SIZE),
                  "baseline_images_per_s": statistics.median(rates["baseline"]),
                  "bigssl_images_per_s": statistics.median(rates["fast"]),
                  "bigssl_exact_decode_images_per_s": statistics.median(rates["exact"]),
                  **decode_rates(images[:500])}
        result["loader_ratio"] = result["bigssl_images_per_s"] / result["baseline_images_per_s"]
        result["loader_ratio_exact_decode"] = (result["bigssl_exact_decode_images_per_s"]
                                               / result["baseline_images_per_s"])
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"{'path':<44}{'images/s':>10}")
    print(f"{'ImageFolder + PIL + RRC(224) (baseline)':<44}{result['baseline_images_per_s']:>10.0f}")
    print(f"{'bigssl shards + simplejpeg + RRC(224)':<44}{result['bigssl_images_per_s']:>10.0f}")
    print(f"{'  the same with data.fast_decode=false':<44}{result['bigssl_exact_decode_images_per_s']:>10.0f}")
    print(f"{'decode only, PIL, one core':<44}{result['decode_pil_per_core']:>10.0f}")
    print(f"{'decode only, simplejpeg, one core':<44}{result['decode_simplejpeg_per_core']:>10.0f}")
    print(f"{'decode only, simplejpeg fast, one core':<44}{result['decode_simplejpeg_fast_per_core']:>10.0f}")
    print(f"loader ratio (bigssl / baseline): {result['loader_ratio']:.2f}x with {args.workers} workers "
          f"({result['loader_ratio_exact_decode']:.2f}x with fast_decode off)")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
