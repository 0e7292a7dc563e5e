"""DistributedDataParallel: full replicas, gradients averaged over ranks (the reference engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bigssl.distributed.engines.base import Capabilities, Engine
from bigssl.distributed.engines.safe_load import load_tensors
from bigssl.distributed.env import alone_in_group
from bigssl.methods.base import Batch, Method, StepOutput

STATE_FILE = "state.pt"


class DDPEngine(Engine):
    kind = "ddp"
    capabilities = Capabilities(holds_whole_parameters=True)
    checkpoint_marker = STATE_FILE

    @staticmethod
    def holds(checkpoint: Path) -> bool:
        return (checkpoint / STATE_FILE).is_file()

    @staticmethod
    def whole_method_state(checkpoint: Path) -> dict[str, torch.Tensor]:
        return load_tensors(checkpoint / STATE_FILE)["method"]

    def setup(self, method: Method, optimizer_factory) -> None:
        method.to(self.device)
        self.prepare(method)
        self.method = method
        self.optimizer = optimizer_factory(method)
        if self.env.distributed or alone_in_group():
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            if names := method.synchronised_buffers():
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(method, names)
            # Gradients as views of the reduction buckets: one copy of the gradients, not two.
            self.module: nn.Module = DistributedDataParallel(method, device_ids=device_ids,
                                                             gradient_as_bucket_view=True)
        else:
            self.module = method

    def forward(self, batch: Batch, step: int) -> StepOutput:
        with self.autocast():
            return self.module(batch, step)

    def backward(self, loss: torch.Tensor) -> None:
        self._scaled(loss).backward()

    def step(self) -> float:
        return self._clip_and_step()

    def save(self, directory: Path, extra: dict[str, Any]) -> None:
        if not self.env.is_main:
            return  # replicas are identical: one copy is the checkpoint
        state = {"method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(), "extra": extra}
        if self.scaler is not None:
            state["loss_scale"] = self.scaler.state_dict()
        with open(directory / STATE_FILE, "wb") as handle:  # a Python file: a full disk raises OSError(ENOSPC)
            torch.save(state, handle)

    def load(self, directory: Path) -> dict[str, Any]:
        state = load_tensors(directory / STATE_FILE, map_location=self.device)
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "loss_scale" in state:
            self.scaler.load_state_dict(state["loss_scale"])
        return state["extra"]
