"""Zero-shot classification with an image–text model (CLIP §3.1.4).

Each class becomes a text classifier: the mean of the normalised text embeddings of a few
prompts ("a photo of the {}.", ...), renormalised; an image is assigned the class whose
classifier is most similar to its normalised image embedding. The class names come from the
labelled shards' index.json (`bigssl shards` records them).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bigssl.config import ViewsConfig
from bigssl.data.quickstart import readable
from bigssl.data.shards import ShardSet, is_remote
from bigssl.data.write import INDEX_NAME
from bigssl.errors import UserError
from bigssl.eval import knn

PROMPTS = ("a photo of the {}.", "a black and white photo of the {}.", "a low resolution photo of the {}.",
           "a cropped photo of the {}.")


def class_names(shards: ShardSet, key: str) -> list[str]:
    """The class names recorded beside the (local) shards."""
    for url in shards.urls:
        path = Path(url).parent / INDEX_NAME
        if not is_remote(url) and path.is_file():
            classes = json.loads(path.read_text()).get("classes")
            if classes:
                return [str(c) for c in classes]
    raise UserError(f"{key}: zero-shot needs class names, and no index.json with 'classes' sits beside the shards")


class _ImageTower(nn.Module):
    """The image side of an image–text method, as a plain model for feature extraction."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.method.encode_image(images)


@torch.no_grad()
def text_classifier(method: nn.Module, names: list[str], prompts: tuple[str, ...] = PROMPTS) -> torch.Tensor:
    """`[C, D]` unit vectors: per class, the renormalised mean of its prompts' text embeddings."""
    was_training = method.training
    method.eval()
    weights = []
    for name in names:
        texts = [prompt.format(readable(name)) for prompt in prompts]
        weights.append(F.normalize(F.normalize(method.encode_text(texts).float(), dim=1).mean(dim=0), dim=0))
    method.train(was_training)
    return torch.stack(weights)


def zero_shot(method: nn.Module, shards: ShardSet, key: str, views: ViewsConfig,
              normalize: Callable[[torch.Tensor], torch.Tensor], batch_size: int, workers: int,
              device: torch.device, timeout_s: float = 0.0) -> dict[str, float]:
    """Top-1/top-5 accuracy of prompt classifiers on the labelled `shards` (a collective: every
    rank embeds its share of the images)."""
    names = class_names(shards, key)
    classifier = text_classifier(method, names).cpu()
    images = knn.extract(_ImageTower(method), shards, views, normalize, batch_size, workers, device, timeout_s)
    if int(images.labels.max()) >= len(names):
        raise UserError(f"{key}: labels reach {int(images.labels.max())} but the index names {len(names)} classes")
    scores = images.features @ classifier.T  # extract() has L2-normalised the image embeddings
    top = scores.topk(min(5, len(names)), dim=1).indices
    hits = top == images.labels[:, None]
    return {"top1": hits[:, 0].float().mean().item(), "top5": hits.any(dim=1).float().mean().item(),
            "samples": len(images.labels)}
