"""Weighted k-nearest-neighbour evaluation (Wu et al. 2018; DINO's protocol: k = 20, T = 0.07).

Features are extracted on every rank (each reads its own shards), gathered, and scored; the
whole of both sets fits in memory at the sizes we use this for (monitoring, quickstart).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bigssl.config import ViewsConfig
from bigssl.data.pipeline import eval_batches
from bigssl.data.shards import ShardSet
from bigssl.distributed import comm


@dataclass
class Features:
    features: torch.Tensor  # [N, D], L2-normalised unless extracted with l2_normalize=False
    labels: torch.Tensor  # [N]


@torch.no_grad()
def extract(model: nn.Module, shards: ShardSet, views: ViewsConfig, normalize: Callable[[torch.Tensor], torch.Tensor],
            batch_size: int, workers: int, device: torch.device, timeout_s: float = 0.0,
            l2_normalize: bool = True) -> Features:
    """Embed every labelled sample of `shards` once (split over ranks), gathered to all ranks.
    Workers cut uint8 crops; `normalize` turns them into model input on the device."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for batch in eval_batches(shards, views, comm.rank(), comm.world_size(), batch_size, workers, timeout_s):
        images = normalize(batch["image"].to(device, non_blocking=True).float().div_(255))
        out = model(images).float()
        feats.append((F.normalize(out, dim=1) if l2_normalize else out).cpu())
        labels.append(batch["label"])
    model.train(was_training)
    local_feats = torch.cat(feats) if feats else torch.zeros(0, 0)
    local_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    return Features(comm.gather_variable(local_feats), comm.gather_variable(local_labels))


def weighted_knn(train: Features, test: Features, k: int = 20, temperature: float = 0.07,
                 chunk: int = 1024) -> dict[str, float]:
    """Each test sample votes with its k most similar training samples, weighted exp(sim / T)."""
    if (train.labels < 0).any() or (test.labels < 0).any():
        raise ValueError("kNN needs labels on every sample (a .cls member per sample)")
    classes = int(max(train.labels.max(), test.labels.max())) + 1
    k = min(k, len(train.labels))
    correct1 = correct5 = 0
    for start in range(0, len(test.labels), chunk):
        feats, truth = test.features[start : start + chunk], test.labels[start : start + chunk]
        sims, idx = (feats @ train.features.T).topk(k, dim=1)
        votes = torch.zeros(len(truth), classes).scatter_add_(1, train.labels[idx], (sims / temperature).exp())
        ranked = votes.topk(min(5, classes), dim=1).indices
        # A class no neighbour voted for is not a prediction, even when top-5 has room for it.
        voted = votes.gather(1, truth[:, None]).squeeze(1) > 0
        correct1 += (ranked[:, 0] == truth).sum().item()
        correct5 += ((ranked == truth[:, None]).any(dim=1) & voted).sum().item()
    n = len(test.labels)
    return {"top1": correct1 / n, "top5": correct5 / n}
