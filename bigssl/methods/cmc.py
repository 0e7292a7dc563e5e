"""CMC, contrastive multiview coding (Tian, Krishnan, Isola 2019, arXiv 1906.05849).

An image in Lab colour gives two views, its L channel and its ab channels (`data.views.policy:
cmc`), each with its own encoder and a linear layer to 128-d unit features. The core-view
objective for two views, L(V1, V2) = L^{V1→V2} + L^{V2→V1}: each view's feature should pick out
the other view of the same image against
- `objective: bank` (the paper's): negatives drawn from the other view's memory bank (momentum
  0.5, one bank per view), with NCE (Z estimated per bank at the first step) or a softmax over
  the sampled entries;
- `objective: batch`: the other view's features of the whole global batch (gathered with
  gradient), a symmetric InfoNCE.

The trunk (`backbone`) takes the normalised Lab image, runs L and ab through their encoders and
concatenates the features: what CMC evaluates, and what kNN, the probes and export see.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from bigssl import losses
from bigssl.config import ModelConfig
from bigssl.errors import ConfigError
from bigssl.methods.base import Batch, Method, StepOutput, register
from bigssl.methods.configs import CMCConfig
from bigssl.methods.instdisc import bank_loss, check_bank_loss
from bigssl.methods.memory_bank import MemoryBank
from bigssl.models.backbones import build_backbone, feature_dim
from bigssl.models.heads import projector

VIEW_CHANNELS = (1, 2)  # L, ab


class SplitViewEncoder(nn.Module):
    """One encoder per channel group of its input; their pooled features, concatenated."""

    def __init__(self, model: ModelConfig, channels: tuple[int, ...] = VIEW_CHANNELS) -> None:
        super().__init__()
        self.channels = channels
        self.encoders = nn.ModuleList()
        for count in channels:
            view_model = copy.deepcopy(model)
            view_model.backbone_args = {**model.backbone_args, "in_chans": count}
            self.encoders.append(build_backbone(view_model))
        self.num_features = sum(feature_dim(e) for e in self.encoders)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([encoder(part) for encoder, part in zip(self.encoders, x.split(self.channels, dim=1),
                                                                   strict=True)], dim=1)


@register("cmc")
class CMC(Method):
    config_class = CMCConfig
    config: CMCConfig

    def build(self) -> None:
        method, views = self.config, self.view_layout
        if method.objective not in ("bank", "batch"):
            raise ConfigError(f"method.objective: {method.objective!r} is not one of bank, batch")
        if method.objective == "bank":
            check_bank_loss(method.loss, method.negatives)
        if views.channel_split != VIEW_CHANNELS or views.color_space != "lab":
            raise ConfigError(f"data.views.policy: method cmc needs the cmc policy (L and ab views: Lab colour, "
                              f"channel_split {list(VIEW_CHANNELS)}), not {views.color_space} views with "
                              f"channel_split {list(views.channel_split)}")
        self.backbone = SplitViewEncoder(self.model_config)
        self.projectors = nn.ModuleList(projector(feature_dim(e), self.model_config.projector)
                                        for e in self.backbone.encoders)
        dim = self.model_config.projector.out_dim
        self.memories = nn.ModuleList(MemoryBank(dim) for _ in VIEW_CHANNELS) if method.objective == "bank" else None
        for memory in self.memories or ():
            memory.allocate(self.run.num_samples, self.run.seed)  # empty if unknown: see MemoryBank.allocate

    def synchronised_buffers(self) -> list[str]:
        if self.memories is None:
            return []
        return [f"memories.{i}.{name}" for i in range(len(VIEW_CHANNELS)) for name in MemoryBank.BUFFERS]

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        method = self.config
        groups = batch["views"]  # [L: [1, B, 1, H, W], ab: [1, B, 2, H, W]]
        if len(groups) != 2:
            raise ValueError("method cmc expects two view groups (L and ab) from the cmc view policy")
        features = [encoder(group[0]) for encoder, group in zip(self.backbone.encoders, groups, strict=True)]
        l_view, ab_view = (F.normalize(head(h).float(), dim=1) for head, h in zip(self.projectors, features,
                                                                                   strict=True))
        if self.memories is None:
            # CLIP's symmetric loss is the mean of the two directions; CMC's objective is their sum.
            loss = 2 * losses.clip_loss(l_view, ab_view, 1 / method.temperature)
        else:
            ids = batch["id"].to(l_view.device)
            for memory in self.memories:
                memory.check(ids)
            seed = self.run.seed
            # Each view's feature against the other view's bank (the paper's L→ab and ab→L terms).
            loss = (bank_loss(self.memories[1], l_view, ids, method, seed, step)
                    + bank_loss(self.memories[0], ab_view, ids, method, seed, step))
            self.memories[0].update(l_view.detach(), ids, method.bank_momentum)
            self.memories[1].update(ab_view.detach(), ids, method.bank_momentum)
        return StepOutput(loss, torch.cat(features, dim=1), l_view.detach(),
                          metrics={"temperature": loss.new_tensor(method.temperature)})
