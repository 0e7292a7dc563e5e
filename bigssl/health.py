"""Is the run healthy? Collapse metrics of the embeddings and the warnings built on them.

- std of L2-normalised embeddings, averaged over dimensions (SimSiam §4.1): 1/√d for a
  well-spread embedding, 0 for a collapsed one;
- RankMe (Garrido et al. 2023, arXiv 2210.02885): exp of the entropy of the normalised singular
  values of the embedding matrix, an effective rank between 1 and min(N, d);
- a loss pinned at the value of a uniform prediction (ln K for DINO and SwAV).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from bigssl import runtime
from bigssl.distributed import comm

if TYPE_CHECKING:
    from bigssl.methods.base import StepOutput

STD_COLLAPSE_FACTOR = 0.2  # warn below 0.2/√d (a spread embedding sits at 1/√d)
UNIFORM_LOSS_TOLERANCE = 0.01  # relative distance to ln K that counts as pinned
PINNED_LOG_STEPS = 3  # consecutive log steps pinned before warning


@torch.no_grad()
def normalized_std(embedding: torch.Tensor) -> float:
    z = F.normalize(embedding.float(), dim=1)
    return float(z.std(dim=0).mean())


@torch.no_grad()
def rankme(embedding: torch.Tensor, eps: float = 1e-7) -> float:
    singular = torch.linalg.svdvals(embedding.float())
    p = singular / singular.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def distillation_stats(teacher_probs: torch.Tensor, student_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """For DINO and SwAV: the entropy of the teacher's (or the codes') distribution, ln K when
    uniform and 0 when one-hot (both are collapse), and KL(teacher ‖ student). Rows are samples,
    columns the K outputs; 0-dim tensors, so a method returns them without a device sync."""
    p = teacher_probs.float()
    log_p = p.clamp(min=1e-12).log()
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    entropy = -(p * log_p).sum(dim=-1).mean()
    kl = (p * (log_p - log_q)).sum(dim=-1).mean()
    return {"teacher_entropy": entropy, "teacher_student_kl": kl}


def embedding_health(embedding: torch.Tensor) -> dict[str, float]:
    return {"health/embedding_std": normalized_std(embedding), "health/rankme": rankme(embedding),
            "health/embedding_std_floor": STD_COLLAPSE_FACTOR / math.sqrt(embedding.shape[1])}


class CollapseWatch:
    """Turns health numbers into one warning per episode (not one per log step)."""

    def __init__(self) -> None:
        self.std_low = False
        self.pinned_steps = 0

    def check(self, step: int, record: dict[str, float]) -> list[str]:
        warnings = []
        std, floor = record.get("health/embedding_std"), record.get("health/embedding_std_floor")
        if std is not None and floor is not None:
            low = std < floor
            if low and not self.std_low:
                warnings.append(f"bigssl: warning: step {step}: embeddings are collapsing (std of normalised "
                                f"embeddings {std:.4f} < {floor:.4f} = {STD_COLLAPSE_FACTOR}/sqrt(d))")
            self.std_low = low
        uniform, loss = record.get("uniform_loss"), record.get("loss")
        if uniform is not None and loss is not None:
            pinned = abs(loss - uniform) <= UNIFORM_LOSS_TOLERANCE * uniform
            self.pinned_steps = self.pinned_steps + 1 if pinned else 0
            if self.pinned_steps == PINNED_LOG_STEPS:
                warnings.append(f"bigssl: warning: step {step}: the loss has stayed at {loss:.4f}, the value of a "
                                f"uniform prediction (ln K = {uniform:.4f}), for {PINNED_LOG_STEPS} log steps: "
                                "collapse")
        return warnings


def log_step_values(out: StepOutput, param_groups: list[dict[str, Any]], ema_momentum: float | None,
                    device: torch.device) -> dict[str, float]:
    """Numbers that tell a healthy run from a sick one, at a log step (a collective): the
    embedding's spread over the global batch, each parameter group's lr and weight decay, the
    EMA momentum of the update just applied (None: no teacher), memory."""
    values: dict[str, float] = {}
    if out.embedding is not None:  # over the global batch: the effective rank needs many rows
        values.update(embedding_health(comm.gather_variable(out.embedding.detach().float())))
    for index, group in enumerate(param_groups):
        name = group.get("name", f"group{index}")
        values[f"lr/{name}"] = 0.0 if group.get("frozen") else float(group["lr"])  # the lr it steps with
        values[f"wd/{name}"] = float(group.get("weight_decay", 0.0))
    if ema_momentum is not None:
        values["ema_momentum"] = ema_momentum
    values.update(runtime.memory_gib(device))
    return values
