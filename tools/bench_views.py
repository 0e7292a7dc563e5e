"""View throughput: bigssl's split augmentation against the per-image PIL pipeline, same JPEGs.

    pip install scikit-image   # its bundled photos are the raw material
    python tools/bench_views.py [--images 256] [--batch 64] [--json]

Two pipelines, each timed in this one process on one core (torch.set_num_threads(1)):
  dino    2 × 224 + 10 × 96 multi-crop with DINO's per-view blur / solarize probabilities
  simclr  2 × 224, SimCLR's colour strength 1 and blur at 0.5
against the baseline the official repositories run in their data workers: PIL decode,
torchvision.transforms on PIL images (RandomResizedCrop, flip, ColorJitter, RandomGrayscale),
PIL's ImageFilter.GaussianBlur and ImageOps.solarize, ToTensor, Normalize, then collation.

Two figures per pipeline, both images/s on one core over the baseline's:
  worker  what our data workers do when the photometric half runs on a GPU: fast JPEG decode,
          every crop cut and resized as uint8 (bigssl.data.views.Geometry), collation;
  cpu     the same plus the photometric half (bigssl.data.views.Photometric) batched on this
          CPU, as on a machine without a GPU.
With --json the last line is a JSON object with every number.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter, ImageOps

from bigssl import recipes, runtime
from bigssl.data.decode import decode_rgb
from bigssl.data.views import Geometry, Photometric

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loader import make_images  # noqa: E402  (a sibling tool, not a package)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PilBlur:
    """The official repositories' blur: PIL's GaussianBlur with a random radius, with probability p."""

    def __init__(self, p: float, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.p, self.sigma = p, sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class PilSolarize:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image) if random.random() < self.p else image


def baseline_dino(local_crops: int) -> Callable[[Image.Image], list[torch.Tensor]]:
    """DINO's DataAugmentationDINO (main_dino.py), with `local_crops` small crops."""
    flip_jitter = [T.RandomHorizontalFlip(), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                   T.RandomGrayscale(p=0.2)]
    finish = [T.ToTensor(), T.Normalize(MEAN, STD)]
    bicubic = T.InterpolationMode.BICUBIC
    global1 = T.Compose([T.RandomResizedCrop(224, (0.4, 1.0), interpolation=bicubic), *flip_jitter, PilBlur(1.0),
                         *finish])
    global2 = T.Compose([T.RandomResizedCrop(224, (0.4, 1.0), interpolation=bicubic), *flip_jitter, PilBlur(0.1),
                         PilSolarize(0.2), *finish])
    local = T.Compose([T.RandomResizedCrop(96, (0.05, 0.4), interpolation=bicubic), *flip_jitter, PilBlur(0.5),
                       *finish])
    return lambda image: [global1(image), global2(image), *(local(image) for _ in range(local_crops))]


def baseline_simclr() -> Callable[[Image.Image], list[torch.Tensor]]:
    """SimCLR's augmentation (App. A, strength 1) as the PyTorch reimplementations write it."""
    view = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(),
                      T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(p=0.2),
                      PilBlur(0.5), T.ToTensor()])
    return lambda image: [view(image), view(image)]


def run_baseline(images: list[bytes], batch: int, transform: Callable) -> float:
    start = time.perf_counter()
    for first in range(0, len(images), batch):
        samples = []
        for data in images[first : first + batch]:
            with Image.open(io.BytesIO(data)) as image:
                samples.append(transform(image.convert("RGB")))
        [torch.stack(crops) for crops in zip(*samples, strict=True)]  # the DataLoader's collation
    return len(images) / (time.perf_counter() - start)


def run_ours(images: list[bytes], batch: int, geometry: Geometry, photometric: Photometric | None) -> float:
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for first in range(0, len(images), batch):
        samples = [geometry(decode_rgb(data, fast=True)) for data in images[first : first + batch]]
        groups = [torch.stack(group) for group in zip(*samples, strict=True)]  # the loader's collation
        if photometric is not None:
            photometric(groups, generator)
    return len(images) / (time.perf_counter() - start)


def views_config(policy: str, local_crops: int):
    return recipes.load(None, [f"data.views.policy={policy}", f"data.views.local_crops={local_crops}"]).data.views


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--local-crops", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of every number")
    args = parser.parse_args()
    torch.set_num_threads(1)  # every figure is per core
    # As `bigssl train` does; the baseline runs in this process too, so it gets the same malloc.
    tuned = runtime.keep_freed_memory()
    random.seed(0)
    images = make_images(args.images)

    pipelines = {
        "dino": (baseline_dino(args.local_crops), views_config("dino", args.local_crops)),
        "simclr": (baseline_simclr(), views_config("simclr", 0)),
    }
    result: dict[str, float | int] = {"images": args.images, "batch": args.batch, "local_crops": args.local_crops,
                                      "threads": torch.get_num_threads(),
                                      "keep_freed_memory": int(tuned)}
    for name, (baseline, views) in pipelines.items():
        geometry, photometric = Geometry(views), Photometric(views)
        run_ours(images[: args.batch], args.batch, geometry, photometric)  # warm-up: allocator, kernels
        rates: dict[str, list[float]] = {"baseline": [], "worker": [], "cpu": []}
        for _ in range(args.repeats):  # interleaved, so drift hits all alike
            rates["baseline"].append(run_baseline(images, args.batch, baseline))
            rates["worker"].append(run_ours(images, args.batch, geometry, None))
            rates["cpu"].append(run_ours(images, args.batch, geometry, photometric))
        for kind, values in rates.items():
            result[f"{name}_{kind}_images_per_s"] = statistics.median(values)
        for kind in ("worker", "cpu"):
            result[f"{name}_{kind}_ratio"] = (result[f"{name}_{kind}_images_per_s"]
                                              / result[f"{name}_baseline_images_per_s"])

    print("images/s on one core")
    print(f"{'pipeline':<10}{'baseline':>10}{'worker':>10}{'ratio':>8}{'cpu-only':>10}{'ratio':>8}")
    for name in pipelines:
        print(f"{name:<10}{result[f'{name}_baseline_images_per_s']:>10.1f}"
              f"{result[f'{name}_worker_images_per_s']:>10.1f}{result[f'{name}_worker_ratio']:>7.2f}x"
              f"{result[f'{name}_cpu_images_per_s']:>10.1f}{result[f'{name}_cpu_ratio']:>7.2f}x")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
