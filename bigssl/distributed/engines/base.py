"""The one interface the trainer uses to run a method, whatever shards or replicates it.

An engine wraps the method and its optimizer, runs forward under the configured precision,
backward, gradient clipping and the optimizer step, and saves and loads its own state (one
file under DDP; one shard per rank for sharded engines). The trainer never asks which engine
it has.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from bigssl.config import Config
from bigssl.distributed.env import DistEnv
from bigssl.errors import ConfigError
from bigssl.methods.base import Batch, Method


class Engine(ABC):
    def __init__(self, config: Config, env: DistEnv, device: torch.device) -> None:
        self.config = config
        self.env = env
        self.device = device
        precision = config.engine.precision
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError("engine.precision: fp16 needs a GPU (use bf16 or fp32 on CPU)")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    method: Method
    optimizer: torch.optim.Optimizer

    @abstractmethod
    def setup(self, method: Method, optimizer_factory) -> None:
        """Wrap `method` and build its optimizer with `optimizer_factory(module)`."""

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @abstractmethod
    def forward(self, batch: Batch, step: int) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self) -> float:
        """Clip, step the optimizer, zero the gradients; returns the pre-clip gradient norm."""

    @abstractmethod
    def save(self, directory: Path, extra: dict[str, Any]) -> None:
        """Write this engine's state (and `extra`, the trainer's) into `directory`."""

    @abstractmethod
    def load(self, directory: Path) -> dict[str, Any]:
        """Restore state from `directory`; returns the trainer's `extra`."""
