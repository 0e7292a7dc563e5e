"""MoCo v1 (He et al. 2019, arXiv 1911.05722) and v2 (Chen et al. 2020, arXiv 2003.04297).

A query encoder (backbone → head) and a key encoder, its EMA (m 0.999, constant). Each query is
contrasted with its own key against a FIFO queue of K = 65536 past keys (InfoNCE, one
direction). The keys of the whole global batch are gathered and enqueued in the same order on
every rank, so every rank holds the same queue; K must be a multiple of the global batch, so a
batch never wraps around the end of the queue.

Shuffle BN: the key encoder sees the global batch in a random order, cut into per-rank slices
(and, with `key_bn_splits`, into smaller slices within a rank), each normalised by its own BN
statistics, so a query and its positive key never share batch statistics; without it the
model "cheats" through BN (MoCo §3.3). The permutation comes from (seed, step), the same on
every rank, so nothing needs broadcasting. `shuffle_bn: false` with `engine.sync_bn: true` is
the alternative.

v1 and v2 differ in their recipes only: v2 = MLP head (model.projector 2 layers, no BN),
τ 0.2, the mocov2 view policy (blur) and a cosine lr.

Momentum index: the official step moves the key encoder with the constant m before computing
its keys (facebookresearch/moco moco/builder.py:129-130 at 78b69ca), from the query weights the
previous step left; the trainer makes the same update right after that previous step. With m
constant, no schedule index is involved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bigssl import losses
from bigssl.distributed import comm
from bigssl.errors import ConfigError
from bigssl.methods.base import Batch, Method, StepOutput, register
from bigssl.methods.configs import MoCoConfig
from bigssl.methods.teacher import EMATeacher
from bigssl.models.backbones import build_backbone, feature_dim
from bigssl.models.heads import projector


@register("moco")
class MoCo(Method):
    config_class = MoCoConfig
    config: MoCoConfig

    def build(self) -> None:
        method, batch = self.config, self.run.global_batch
        if method.queue_size <= 0 or method.queue_size % batch:
            raise ConfigError(f"method.queue_size: {method.queue_size} is not a positive multiple of the global "
                              f"batch optim.batch_size={batch} (each step enqueues the whole global batch)")
        if method.key_bn_splits < 1 or self.run.rank_batch % method.key_bn_splits:
            raise ConfigError(f"method.key_bn_splits: {method.key_bn_splits} must divide the per-rank batch")
        self.backbone = build_backbone(self.model_config)
        self.projector = projector(feature_dim(self.backbone), self.model_config.projector)
        self.teacher = EMATeacher(method.momentum)  # constant m
        self.key_backbone = self.teacher.copy(self.backbone)
        self.key_projector = self.teacher.copy(self.projector)
        # Identical on every rank (same seed, same gathered keys): a buffer, checkpointed.
        queue = F.normalize(torch.randn(method.queue_size, self.model_config.projector.out_dim), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        method = self.config
        views = batch["views"][0]  # [2, B, C, H, W]: view 0 → queries, view 1 → keys
        features = self.backbone(views[0])
        q = self.projector(features)
        with torch.no_grad():
            own_keys, all_keys = self._keys(views[1], step)
        # A copy of the queue: the enqueue below writes into it before backward reads it.
        loss = losses.info_nce(q, own_keys, method.temperature, queue=self.queue.clone())
        self._enqueue(F.normalize(all_keys.float(), dim=1))
        return StepOutput(loss, features, q.detach(), metrics={"temperature": loss.new_tensor(method.temperature)})

    def _encode_keys(self, images: torch.Tensor) -> torch.Tensor:
        return self.key_projector(self.key_backbone(images))

    def _keys(self, images: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's keys in its own order, and the global batch's keys in global order."""
        method = self.config
        local, rank = len(images), comm.rank()
        if not method.shuffle_bn:
            keys = self._encode_keys(images)
            return keys, comm.gather_no_grad(keys)
        everything = comm.gather_no_grad(images)  # [W·B, ...], rank-major
        generator = torch.Generator().manual_seed(self.run.seed * 1_000_003 + step)
        order = torch.randperm(len(everything), generator=generator).to(images.device)
        mine = order[rank * local : (rank + 1) * local]
        shuffled = torch.cat([self._encode_keys(part) for part in everything[mine].chunk(method.key_bn_splits)])
        gathered = comm.gather_no_grad(shuffled)  # row j is the key of sample order[j]
        all_keys = torch.empty_like(gathered)
        all_keys[order] = gathered
        return all_keys[rank * local : (rank + 1) * local], all_keys

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        start = int(self.queue_pointer)
        if len(keys) != self.run.global_batch:
            raise ValueError(f"MoCo enqueues the global batch ({self.run.global_batch}), got {len(keys)} keys")
        self.queue[start : start + len(keys)] = keys.to(self.queue.dtype)
        self.queue_pointer.fill_((start + len(keys)) % len(self.queue))

    def synchronised_buffers(self) -> list[str]:
        return ["queue", "queue_pointer"]
