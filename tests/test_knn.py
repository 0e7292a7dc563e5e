import math

import torch
import torch.nn.functional as F

from bigssl.eval.knn import Features, weighted_knn


def knn_by_hand(train: Features, test: Features, k: int, t: float) -> tuple[float, float]:
    top1 = top5 = 0
    for feature, truth in zip(test.features, test.labels, strict=True):
        sims = [(float(feature @ f), int(label)) for f, label in zip(train.features, train.labels, strict=True)]
        nearest = sorted(sims, key=lambda s: -s[0])[:k]
        votes: dict[int, float] = {}
        for sim, label in nearest:
            votes[label] = votes.get(label, 0.0) + math.exp(sim / t)
        ranked = sorted(votes, key=lambda c: -votes[c])
        top1 += ranked[0] == int(truth)
        top5 += int(truth) in ranked[:5]
    return top1 / len(test.labels), top5 / len(test.labels)


def test_weighted_knn_matches_a_hand_count():
    generator = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(7, 16, generator=generator), dim=1)
    train_labels = torch.randint(0, 7, (200,), generator=generator)
    test_labels = torch.randint(0, 7, (60,), generator=generator)

    def embed(labels: torch.Tensor) -> torch.Tensor:
        return F.normalize(centers[labels] + 0.9 * torch.randn(len(labels), 16, generator=generator), dim=1)

    train, test = Features(embed(train_labels), train_labels), Features(embed(test_labels), test_labels)
    for k, t in [(1, 0.07), (20, 0.07), (20, 1.0)]:
        scores = weighted_knn(train, test, k=k, temperature=t, chunk=17)
        top1, top5 = knn_by_hand(train, test, k, t)
        assert scores["top1"] == top1 and scores["top5"] == top5
    assert 0.2 < weighted_knn(train, test)["top1"] < 1.0  # clusters are findable, not trivial
