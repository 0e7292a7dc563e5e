"""The multi-node tests' method, registered wherever this module is imported (the tasks of a
test job import it through tests/slurm/launch.py)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from bigssl.config import MethodConfig
from bigssl.distributed import comm
from bigssl.methods.base import Method, StepOutput, register

HOLD_LIMIT_S = 600  # a hold never outlasts this (a test that failed to release it must not hang)


@dataclass
class RecorderConfig(MethodConfig):
    name: str = "test_mn_recorder"
    out: str = ""  # one file per rank: "DIR/ids-{rank}.txt"
    hold_at_step: int = -1  # every rank waits at the start of this step index...
    hold_for: str = "usr1"  # ... until its process has the stop signal (usr1), or until this file exists


@register("test_mn_recorder")
class Recorder(Method):
    """Per step and rank, one line: step | host | sample ids | pixel sums of the views | sha256 of
    the whole weights before the step's update. Two runs compare line for line; a resumed run's
    first line carries the weights it loaded."""

    config_class = RecorderConfig
    config: RecorderConfig

    def build(self) -> None:
        # Several units for FSDP2 (a Sequential's members), with rows that 2, 3 and 4 ranks
        # shard unevenly: a resume at another world size really reshards.
        self.backbone = nn.Sequential(nn.Linear(3, 22), nn.Tanh(), nn.Linear(22, 5))

    def training_step(self, batch, step):
        settings = self.config
        out = Path(settings.out.format(rank=comm.rank()))
        if step == settings.hold_at_step:
            self._hold(out)
        pixels = [f"{v:.17g}" for v in batch["views"][0].double().sum(dim=(0, 2, 3, 4)).tolist()]
        ids = " ".join(str(i) for i in batch["id"].tolist())
        with open(out, "a") as handle:
            handle.write(f"{step} | {socket.gethostname()} | {ids} | {' '.join(pixels)} | {self._fingerprint()}\n")
        pooled = batch["views"][0].mean(dim=(0, 3, 4))  # [V, B, C, S, S] → [B, C]
        return StepOutput(self.backbone(pooled).pow(2).mean(), metrics={"pooled_mean": pooled.mean()})

    def _fingerprint(self) -> str:
        """Of every whole parameter (an all-gather of the shards under FSDP2: every rank takes
        the same step, so every rank calls it)."""
        return fingerprint(p.full_tensor() if isinstance(p, DTensor) else p for p in self.backbone.parameters())

    def _hold(self, out: Path) -> None:
        marker = out.with_name(out.name + ".holding")
        marker.write_text(f"{socket.gethostname()} {os.getpid()}\n")
        deadline = time.monotonic() + HOLD_LIMIT_S
        while time.monotonic() < deadline and not self._released():
            time.sleep(0.05)

    def _released(self) -> bool:
        if self.config.hold_for != "usr1":
            return Path(self.config.hold_for).exists()
        # The trainer's stop handler (bigssl.preemption.StopRequest) records the signal.
        handler = signal.getsignal(signal.SIGUSR1)
        return getattr(getattr(handler, "__self__", None), "received", None) is not None


def fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 of the tensors' bytes, in order (the backbone's parameter order)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
