"""A memory bank of one unit vector per training sample (InstDisc, CMC).

Entries are addressed by the shard index's global sample ids. Noise entries are drawn for the
whole global batch from (seed, step) and each rank takes its rows, so W ranks draw exactly what
one process holding all W·B samples draws, and a resumed run draws what the uninterrupted one
did. Writes gather (feature, id) from every rank first, so every rank's bank stays identical;
the NCE normaliser Z is estimated once from every rank's scores, then frozen. Both are buffers
(checkpointed) that the method lists in `synchronised_buffers`, so DDP does not re-broadcast a
dataset-sized tensor at every step.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from bigssl import losses
from bigssl.distributed import comm
from bigssl.errors import ConfigError


def noise_ids(seed: int, step: int, bank_size: int, negatives: int, local_batch: int) -> torch.Tensor:
    """`[local_batch, negatives]` uniform bank entries: this rank's rows of a draw for the global batch."""
    key = hashlib.blake2b(f"{seed}/{step}/noise".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
    everything = torch.randint(bank_size, (local_batch * comm.world_size(), negatives), generator=generator)
    return everything[comm.rank() * local_batch : (comm.rank() + 1) * local_batch]


class MemoryBank(nn.Module):
    BUFFERS = ("bank", "normaliser")

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("bank", torch.zeros(0, dim))
        self.register_buffer("normaliser", torch.zeros(()))  # NCE's Z; 0 = not estimated yet

    def allocate(self, num_samples: int | None, seed: int) -> None:
        """Random unit vectors, one per training sample. With the count unknown (None: a method
        built to evaluate or export its trunk) the bank stays empty, and a training step refuses
        it (`check`)."""
        if num_samples is None:
            return
        if not num_samples:
            raise ConfigError("data.train: a memory bank needs the dataset size and global sample ids (an "
                              "index.json beside the shards, as `bigssl shards` writes)")
        bank = torch.randn(num_samples, self.bank.shape[1], generator=torch.Generator().manual_seed(seed))
        self.bank = F.normalize(bank, dim=1).to(self.bank.device)

    def check(self, ids: torch.Tensor) -> None:
        if len(self.bank) == 0 or bool((ids < 0).any()) or bool((ids >= len(self.bank)).any()):
            raise ConfigError("data.train: the memory bank needs global sample ids within it (shards with an "
                              "index.json, whose sample count sizes the bank)")

    def sampled_scores(self, f: torch.Tensor, ids: torch.Tensor, noise: torch.Tensor,
                       temperature: float) -> torch.Tensor:
        """`[B, 1 + m]` of vᵀf/τ: each sample's own entry first, then its noise entries."""
        positive = (f * self.bank[ids]).sum(dim=1, keepdim=True)  # indexing copies: later writes are safe
        others = torch.einsum("bd,bmd->bm", f, self.bank[noise.to(ids.device)])
        return torch.cat([positive, others], dim=1) / temperature

    def all_scores(self, f: torch.Tensor, temperature: float) -> torch.Tensor:
        # A copy: backward needs the bank as it was, and `update` writes into it before that.
        return f @ self.bank.clone().T / temperature

    def nce(self, scores: torch.Tensor) -> torch.Tensor:
        """NCE with Z = n · mean exp(score), estimated at the first call over every rank's scores."""
        if float(self.normaliser) == 0:
            with torch.no_grad():
                local = torch.stack([scores.exp().sum(), scores.new_tensor(scores.numel())])
                total = comm.all_reduce_sum_no_grad(local)
                self.normaliser.fill_(float(len(self.bank) * total[0] / total[1]))
        return losses.nce_loss(scores, torch.log(self.normaliser), len(self.bank))

    @torch.no_grad()
    def update(self, f: torch.Tensor, ids: torch.Tensor, momentum: float) -> None:
        """v ← normalise(m·v + (1 − m)·f) for every sample of the global batch."""
        all_f, all_ids = comm.gather_no_grad(f), comm.gather_no_grad(ids)
        mixed = momentum * self.bank[all_ids] + (1 - momentum) * all_f.to(self.bank.dtype)
        self.bank[all_ids] = F.normalize(mixed, dim=1)
