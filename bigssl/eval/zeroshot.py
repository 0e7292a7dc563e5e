"""Zero-shot classification with an image–text model (CLIP §3.1.4).

Each class becomes a text classifier: the mean of the normalised text embeddings of its
prompts (a class name in each template: "a photo of the {}.", ...), renormalised; an image is
assigned the class whose classifier is most similar to its normalised image embedding. Class
names and templates: `bigssl.eval.prompts` (the shards' index.json, or ImageNet's published lists).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bigssl.config import ViewsConfig
from bigssl.data.shards import ShardSet, is_remote
from bigssl.data.write import INDEX_NAME
from bigssl.errors import UserError
from bigssl.eval import knn
from bigssl.eval.prompts import AUTO, GENERIC_TEMPLATES, PromptSet, prompt_set


def index_classes(shards: ShardSet) -> list[str] | None:
    """The class names recorded beside the (local) shards, or None."""
    for url in shards.urls:
        path = Path(url).parent / INDEX_NAME
        if not is_remote(url) and path.is_file():
            classes = json.loads(path.read_text()).get("classes")
            if classes:
                return [str(c) for c in classes]
    return None


def prompts_for(shards: ShardSet, key: str, classnames: str = AUTO, templates: str = AUTO) -> PromptSet:
    return prompt_set(index_classes(shards), classnames, templates, key)


class _ImageTower(nn.Module):
    """The image side of an image–text method, as a plain model for feature extraction."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.method.encode_image(images)


@torch.no_grad()
def text_classifier(method: nn.Module, names: tuple[str, ...] | list[str],
                    templates: tuple[str, ...] = GENERIC_TEMPLATES) -> torch.Tensor:
    """`[C, D]` unit vectors: per class, the renormalised mean of its prompts' text embeddings."""
    was_training = method.training
    method.eval()
    weights = []
    for name in names:
        texts = [template.replace("{}", name) for template in templates]  # not format(): a file may hold other braces
        weights.append(F.normalize(F.normalize(method.encode_text(texts).float(), dim=1).mean(dim=0), dim=0))
    method.train(was_training)
    return torch.stack(weights)


def zero_shot(method: nn.Module, shards: ShardSet, key: str, views: ViewsConfig,
              normalize: Callable[[torch.Tensor], torch.Tensor], batch_size: int, workers: int,
              device: torch.device, timeout_s: float = 0.0, prompts: PromptSet | None = None) -> dict[str, float]:
    """Top-1/top-5 accuracy of prompt classifiers on the labelled `shards` (a collective: every
    rank embeds its share of the images); `prompts` by default as `prompts_for` chooses them."""
    prompts = prompts or prompts_for(shards, key)
    names = prompts.names
    classifier = text_classifier(method, names, prompts.templates).cpu()
    images = knn.extract(_ImageTower(method), shards, views, normalize, batch_size, workers, device, timeout_s)
    if int(images.labels.max()) >= len(names):
        raise UserError(f"{key}: labels reach {int(images.labels.max())} but there are {len(names)} class names")
    scores = images.features @ classifier.T  # extract() has L2-normalised the image embeddings
    top = scores.topk(min(5, len(names)), dim=1).indices
    hits = top == images.labels[:, None]
    return {"top1": hits[:, 0].float().mean().item(), "top5": hits.any(dim=1).float().mean().item(),
            "samples": len(images.labels)}
