"""tools/gpu_check.py's sizes and data: the two recipes at GPU scale or tiny on a CPU, and JPEG
shards written from photos the machine already has (scikit-image's sample photos, else
generated ones), through bigssl's own shard writer."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bigssl import recipes
from bigssl.config import Config
from bigssl.data.write import Sample, write_shards

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Profile:
    """What one model is checked at: its recipe, the overrides that size it, the batches."""

    name: str
    recipe: str
    overrides: list[str]
    step_batch: int  # per-GPU batch of the engine-step checks
    speed_batch: int  # per-GPU batch of the throughput checks: a realistic one
    notes: list[str] = field(default_factory=list)
    compiled: object = None  # the compile check, set by gpucheck_run once the eager run has a baseline

    def config(self, *extra: str) -> Config:
        return recipes.load(REPO / self.recipe, [*self.overrides, *extra])


def profiles(cpu: bool) -> dict[str, Profile]:
    if not cpu:
        # DINO ViT-S/16 at its recipe (2 × 224 + 10 × 96), 128 per GPU (the official 1024 over 8);
        # SimCLR ResNet-50, 2 × 224, channels-last (the recipe's default), 256 per GPU.
        return {"dino_vit_s16": Profile("dino_vit_s16", "recipes/imagenet/dino_vit_small.yaml", [], 16, 128),
                "simclr_resnet50": Profile("simclr_resnet50", "recipes/imagenet/simclr_resnet50.yaml", [], 32, 256)}
    tiny_vit = ["model.backbone=vit_tiny_patch16_224",
                "model.backbone_args={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, "
                "dynamic_img_size: true, drop_path_rate: 0.1}",
                "data.views.size=32", "data.views.local_size=16", "data.views.local_crops=2",
                "method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16"]
    tiny_resnet = ["model.backbone=resnet18", "model.backbone_args={channels: [8, 16, 16, 32]}",
                   "model.small_stem=true", "data.views.size=32", "model.projector.hidden_dim=32",
                   "model.projector.out_dim=16"]
    return {"dino_vit_s16": Profile("dino_vit_s16", "recipes/imagenet/dino_vit_small.yaml", tiny_vit, 4, 8,
                                    ["--cpu: a 2-block ViT at 32 px, 2 + 2 crops"]),
            "simclr_resnet50": Profile("simclr_resnet50", "recipes/imagenet/simclr_resnet50.yaml", tiny_resnet, 4, 8,
                                       ["--cpu: a narrow ResNet-18 at 32 px"])}


def run_overrides(shards: str, run_dir: Path, batch: int, steps: int, every: int, workers: int) -> list[str]:
    """A short run of the recipe on the generated shards: no evaluation, one log record per
    `every` steps (each a timing window), a dataset long enough that no epoch ends."""
    return [f"data.train={shards}", "data.val=", "eval.knn_at_end=false", "eval.knn_baseline=false",
            f"log.dir={run_dir}", "log.tensorboard=false", "log.progress=false", f"log.every_steps={every}",
            "checkpoint.every_steps=0", "checkpoint.resume=false", f"optim.batch_size={batch}",
            f"optim.max_steps={steps}", f"data.workers={workers}", "data.samples_per_epoch=100000000",
            "data.timeout_s=120"]


def data_workers(cpu: bool) -> int:
    """Every core but two (the training process and its CUDA threads): 14 on a 16-core machine."""
    return 1 if cpu else max(1, (os.cpu_count() or 4) - 2)


def _photos() -> list[np.ndarray]:
    """RGB uint8 photos: scikit-image's samples where it is installed (it is a dev dependency
    and on the GPU machines' image), else smooth random scenes."""
    try:
        from skimage import data

        names = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
        return [getattr(data, name)() for name in names]
    except Exception:  # not installed, or a sample missing from this version
        generator = np.random.default_rng(0)
        photos = []
        for _ in range(6):
            coarse = generator.random((12, 16, 3))
            photo = np.kron(coarse, np.ones((40, 40, 1)))  # 480 × 640 blocks, then smoothed by resizing
            image = Image.fromarray((photo * 255).astype(np.uint8)).resize((160, 120)).resize((640, 480),
                                                                                              Image.BICUBIC)
            photos.append(np.asarray(image))
        return photos


def write_jpeg_shards(out: Path, count: int, side: int) -> str:
    """`count` distinct JPEGs (random crops of the photos, ImageNet-like 4:3 frames with the short
    side `side`, quality 90) in shards of 256; returns the brace pattern over them."""
    generator = np.random.default_rng(1)
    photos = _photos()

    def samples():
        for index in range(count):
            photo = photos[index % len(photos)]
            height, width = photo.shape[:2]
            crop_h = int(generator.integers(height // 2, height + 1))
            crop_w = min(width, int(crop_h * 4 / 3))
            top = int(generator.integers(0, height - crop_h + 1))
            left = int(generator.integers(0, width - crop_w + 1))
            image = Image.fromarray(photo[top:top + crop_h, left:left + crop_w]).convert("RGB")
            image = image.resize((round(side * 4 / 3), side), Image.BILINEAR)
            if index % 2:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            yield Sample(buffer.getvalue(), "jpg", index % 10)

    index = write_shards(samples(), out, [str(c) for c in range(10)], maxcount=256)
    return str(out / f"shard-{{000000..{len(index['shards']) - 1:06d}}}.tar")
