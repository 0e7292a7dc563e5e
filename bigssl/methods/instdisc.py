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

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bigssl import losses
from bigssl.config import Config, MethodConfig
from bigssl.distributed import comm
from bigssl.errors import ConfigError
from bigssl.methods.base import Batch, Method, register
from bigssl.models.backbones import build_backbone, feature_dim
from bigssl.models.heads import projector


@dataclass
class InstDiscConfig(MethodConfig):
    name: str = "instdisc"
    temperature: float = 0.07
    negatives: int = 4096  # noise entries per positive
    bank_momentum: float = 0.5
    loss: str = "nce"  # nce | softmax


def noise_ids(seed: int, step: int, bank_size: int, negatives: int, local_batch: int) -> torch.Tensor:
    """`[local_batch, negatives]` uniform bank entries: this rank's rows of a draw for the whole
    global batch from (seed, step), so W ranks draw what one process with all W·B samples
    draws, and a resumed run draws what the uninterrupted one did."""
    key = hashlib.blake2b(f"{seed}/{step}/noise".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
    everything = torch.randint(bank_size, (local_batch * comm.world_size(), negatives), generator=generator)
    return everything[comm.rank() * local_batch : (comm.rank() + 1) * local_batch]


@register("instdisc")
class InstDisc(Method):
    config_class = InstDiscConfig

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        method: InstDiscConfig = config.method  # type: ignore[assignment]
        if method.loss not in ("nce", "softmax"):
            raise ConfigError(f"method.loss: {method.loss!r} is not one of nce, softmax")
        if method.loss == "nce" and method.negatives < 1:
            raise ConfigError("method.negatives: NCE needs at least one noise sample per positive")
        self.backbone = build_backbone(config.model)
        self.projector = projector(feature_dim(self.backbone), config.model.projector)
        self.register_buffer("bank", torch.zeros(0, config.model.projector.out_dim))
        self.register_buffer("normaliser", torch.zeros(()))  # Z; 0 = not estimated yet

    def configure_data(self, num_samples: int | None) -> None:
        if not num_samples:
            raise ConfigError("data.train: InstDisc needs the dataset size and global sample ids (an "
                              "index.json beside the shards, as `bigssl shards` writes)")
        bank = torch.randn(num_samples, self.bank.shape[1], generator=torch.Generator().manual_seed(self.config.seed))
        self.bank = F.normalize(bank, dim=1).to(self.bank.device)

    def synchronised_buffers(self) -> list[str]:
        return ["bank", "normaliser"]

    def training_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        method: InstDiscConfig = self.config.method  # type: ignore[assignment]
        ids = batch["id"].to(self.bank.device)
        if len(self.bank) == 0 or bool((ids < 0).any()) or bool((ids >= len(self.bank)).any()):
            raise ConfigError("data.train: InstDisc needs global sample ids within the bank (shards with an "
                              "index.json, and Method.configure_data called with their count)")
        features = self.backbone(batch["views"][0][0])  # one augmented view per image
        f = F.normalize(self.projector(features).float(), dim=1)
        positives = self.bank[ids]  # copies: the bank may change in place below
        if method.loss == "softmax" and method.negatives == 0:
            logits = f @ self.bank.T / method.temperature
            loss = F.cross_entropy(logits, ids)
        else:
            drawn = noise_ids(self.config.seed, step, len(self.bank), method.negatives, len(f))
            noise = self.bank[drawn.to(ids.device)]  # [B, m, D]
            scores = torch.cat([(f * positives).sum(1, keepdim=True), torch.einsum("bd,bmd->bm", f, noise)], dim=1)
            scores = scores / method.temperature
            loss = self._nce(scores) if method.loss == "nce" else F.cross_entropy(
                scores, torch.zeros(len(f), dtype=torch.long, device=f.device))
        self._update_bank(f.detach(), ids)
        return {"loss": loss, "features": features, "embedding": f.detach(),
                "temperature": loss.new_tensor(method.temperature)}

    def _nce(self, scores: torch.Tensor) -> torch.Tensor:
        """NCE with Z estimated at the first step from every rank's scores, then frozen."""
        if float(self.normaliser) == 0:
            with torch.no_grad():  # Z = n · mean exp(score), over every rank's scores
                local = torch.stack([scores.exp().sum(), scores.new_tensor(scores.numel())])
                total = comm.all_reduce_sum_no_grad(local)
                self.normaliser.fill_(float(len(self.bank) * total[0] / total[1]))
        return losses.nce_loss(scores, torch.log(self.normaliser), len(self.bank))

    @torch.no_grad()
    def _update_bank(self, f: torch.Tensor, ids: torch.Tensor) -> None:
        all_f, all_ids = comm.gather_no_grad(f), comm.gather_no_grad(ids)
        momentum = self.config.method.bank_momentum
        updated = F.normalize(momentum * self.bank[all_ids] + (1 - momentum) * all_f.to(self.bank.dtype), dim=1)
        self.bank[all_ids] = updated
