"""Linear probe on cached (frozen) backbone features, following each method's published protocol.

Each protocol (optimizer, base lr and its batch scaling, batch, epochs, weight decay, schedule)
names its source: a paper section or an official evaluation script. The published probes train
on augmented crops; on cached
features of the deterministic view each epoch is one pass over fixed vectors, which is far
cheaper and typically scores a little lower. Override any field from the command line.

Features are standardised with the training set's per-dimension mean and std by default: an
affine map the classifier could learn itself (same family of classifiers), but it makes one
published lr work across backbones whose feature scales differ by orders of magnitude. MAE's
probe does the same with a BatchNorm without affine parameters. `standardize=False` feeds the
raw features, as the ResNet-era protocols did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from bigssl.optim import LARS


@dataclass(frozen=True)
class Protocol:
    lr: float  # base lr; × batch/256 when scaled
    batch_size: int
    epochs: int
    scale_lr: bool = True
    optimizer: str = "sgd"  # sgd | lars
    nesterov: bool = False
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = ()  # step decay ×0.1 at these epochs; () = cosine to 0
    source: str = ""

    def lr_for(self, batch_size: int) -> float:
        return self.lr * batch_size / 256 if self.scale_lr else self.lr


PROTOCOLS: dict[str, Protocol] = {
    "simclr": Protocol(0.1, 4096, 90, nesterov=True, source="SimCLR App. B.6 (arXiv 2002.05709)"),
    "moco": Protocol(30.0, 256, 100, scale_lr=False, milestones=(60, 80), source="moco main_lincls.py"),
    "mocov2": Protocol(30.0, 256, 100, scale_lr=False, milestones=(60, 80), source="moco main_lincls.py"),
    "byol": Protocol(0.2, 1024, 80, nesterov=True, source="byol configs/eval.py"),
    "swav": Protocol(0.3, 256, 100, scale_lr=False, weight_decay=1e-6, source="SwAV App. A.3 (2006.09882)"),
    "simsiam": Protocol(0.02, 4096, 90, optimizer="lars", source="SimSiam App. A (2011.10566)"),
    "barlow": Protocol(0.3, 256, 100, scale_lr=False, weight_decay=1e-6, source="barlowtwins evaluate.py"),
    "mocov3": Protocol(0.1, 1024, 90, source="moco-v3 main_lincls.py (ResNet; ViT: 3 x BS/256)"),
    "dino": Protocol(0.001, 1024, 100, source="dino eval_linear.py"),
    "cmc": Protocol(30.0, 256, 60, scale_lr=False, milestones=(30, 40, 50), source="CMC LinearProbing.py"),
    # MoCo §4.1 compares InstDisc under its own protocol (54.3 with NCE, K = 4096).
    "instdisc": Protocol(30.0, 256, 100, scale_lr=False, milestones=(60, 80), source="moco main_lincls.py"),
}
DEFAULT = PROTOCOLS["simclr"]


def protocol_for(method: str, backbone: str) -> Protocol:
    protocol = PROTOCOLS.get(method, DEFAULT)
    if method == "mocov3" and backbone.startswith("vit"):
        protocol = replace(protocol, lr=3.0)  # MoCo v3's ViT probe
    return protocol


def _lr_factor(protocol: Protocol, epoch_progress: float) -> float:
    if protocol.milestones:
        return 0.1 ** sum(epoch_progress >= m for m in protocol.milestones)
    return 0.5 * (1 + math.cos(math.pi * epoch_progress / protocol.epochs))


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return int((top[:, 0] == labels).sum()), int((top == labels[:, None]).any(dim=1).sum())


def train_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                protocol: Protocol, seed: int = 0, standardize: bool = True) -> dict[str, float]:
    """Fit a linear classifier on `train_x` with `protocol`; top-1/top-5 on `val_x`."""
    if standardize:
        mean, std = train_x.mean(dim=0), train_x.std(dim=0) + 1e-6
        train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    classes = int(max(train_y.max(), val_y.max())) + 1
    head = nn.Linear(train_x.shape[1], classes)
    with torch.no_grad():  # MoCo's probe init: small normal weights, zero bias
        head.weight.normal_(0, 0.01, generator=generator)
        head.bias.zero_()
    batch = min(protocol.batch_size, len(train_y))
    lr = protocol.lr_for(batch)
    if protocol.optimizer == "lars":
        optimizer: torch.optim.Optimizer = LARS(head.parameters(), lr=lr, momentum=0.9,
                                                weight_decay=protocol.weight_decay)
    else:
        optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, nesterov=protocol.nesterov,
                                    weight_decay=protocol.weight_decay)
    steps_per_epoch = max(1, len(train_y) // batch)  # full batches, as the published loaders drop the tail
    loss = torch.zeros(())
    for epoch in range(protocol.epochs):
        order = torch.randperm(len(train_y), generator=generator)
        for index in range(steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr * _lr_factor(protocol, epoch + index / steps_per_epoch)
            rows = order[index * batch : (index + 1) * batch]
            loss = F.cross_entropy(head(train_x[rows]), train_y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        top1, top5 = _topk_correct(head(val_x), val_y)
    return {"top1": top1 / len(val_y), "top5": top5 / len(val_y), "train_loss": float(loss.detach()),
            "epochs": protocol.epochs, "batch_size": batch, "lr": lr}
