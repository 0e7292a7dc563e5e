"""InstDisc / NPID (Wu, Xiong, Yu, Lin 2018, arXiv 1805.01978).

Every image is its own class. A memory bank holds one unit vector per image of the dataset
(addressed by the shard index's global sample ids); an augmented view's feature
f = normalise(fc(backbone(x))) (128-d) should pick out its own bank entry against noise
entries drawn uniformly from the bank:

- `loss: nce` (the paper's default): P(i|f) = exp(v_iᵀf/τ)/Z, Z estimated once, at the first
  step, as n · mean exp(vᵀf/τ) over the scored entries (all-reduced, so identical on every
  rank), then frozen and checkpointed; h = P/(P + m/n) with m = `negatives` noise entries
  per positive; J = −[log h(pos) + Σ log(1 − h(noise))], mean over the batch.
- `loss: softmax`: cross-entropy of the positive against the same sampled entries
  (`negatives: 0` = against the whole bank).

After each step every entry seen moves to normalise(m·v + (1 − m)·f) with m = 0.5; features and
ids are gathered from every rank first, so every rank's bank stays identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bigssl.errors import ConfigError
from bigssl.methods.base import Batch, Method, StepOutput, register
from bigssl.methods.configs import InstDiscConfig
from bigssl.methods.memory_bank import MemoryBank, noise_ids
from bigssl.models.backbones import build_backbone, feature_dim
from bigssl.models.heads import projector


def check_bank_loss(loss: str, negatives: int) -> None:
    if loss not in ("nce", "softmax"):
        raise ConfigError(f"method.loss: {loss!r} is not one of nce, softmax")
    if loss == "nce" and negatives < 1:
        raise ConfigError("method.negatives: NCE needs at least one noise sample per positive")


def bank_loss(memory: MemoryBank, f: torch.Tensor, ids: torch.Tensor, method, seed: int, step: int) -> torch.Tensor:
    """f against its own entry of `memory` and noise entries: NCE, or a softmax over the sampled
    entries (or, with `negatives: 0`, over the whole bank)."""
    if method.loss == "softmax" and method.negatives == 0:
        return F.cross_entropy(memory.all_scores(f, method.temperature), ids)
    noise = noise_ids(seed, step, len(memory.bank), method.negatives, len(f))
    scores = memory.sampled_scores(f, ids, noise, method.temperature)
    if method.loss == "nce":
        return memory.nce(scores)
    return F.cross_entropy(scores, torch.zeros(len(f), dtype=torch.long, device=f.device))


@register("instdisc")
class InstDisc(Method):
    config_class = InstDiscConfig
    config: InstDiscConfig

    def build(self) -> None:
        check_bank_loss(self.config.loss, self.config.negatives)
        self.backbone = build_backbone(self.model_config)
        self.projector = projector(feature_dim(self.backbone), self.model_config.projector)
        self.memory = MemoryBank(self.model_config.projector.out_dim)
        self.memory.allocate(self.run.num_samples, self.run.seed)  # empty if unknown: see MemoryBank.allocate

    def synchronised_buffers(self) -> list[str]:
        return [f"memory.{name}" for name in MemoryBank.BUFFERS]

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        method = self.config
        ids = batch["id"].to(self.memory.bank.device)
        self.memory.check(ids)
        features = self.backbone(batch["views"][0][0])  # one augmented view per image
        f = F.normalize(self.projector(features).float(), dim=1)
        loss = bank_loss(self.memory, f, ids, method, self.run.seed, step)
        self.memory.update(f.detach(), ids, method.bank_momentum)
        return StepOutput(loss, features, f.detach(), metrics={"temperature": loss.new_tensor(method.temperature)})
