"""The one interface the trainer uses to run a method, whatever shards or replicates it.

An engine wraps the method and its optimizer, runs forward under the configured precision,
backward, gradient clipping and the optimizer step, and saves and loads its own state (one
file under DDP; one shard per rank for sharded engines). The trainer never asks which engine
it has.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from bigssl.config import Config
from bigssl.distributed.engines.loss_scale import DynamicLossScaler
from bigssl.distributed.env import DistEnv
from bigssl.distributed.global_bn import convert_sync_bn
from bigssl.errors import ConfigError
from bigssl.methods.base import Batch, Method, StepOutput

# fp16 on CPU is slow and pointless for training; the test suite sets this to exercise loss
# scaling on machines without a GPU.
CPU_FP16_ENV = "BIGSSL_ALLOW_CPU_FP16"


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do, declared by the engine, so that no caller asks which engine it is."""

    # Every rank holds every parameter whole between steps, so a method's own modules (CLIP's
    # text tower) run on one rank as they are; otherwise only `full_module`'s result is whole.
    holds_whole_parameters: bool
    # Why `engine.compile` (torch.compile of the backbone) is refused under this engine; None: it is not.
    compile_refusal: str | None = None


class Engine(ABC):
    """Subclasses set `kind` (the `engine.kind` that selects them) and `capabilities`, implement
    the abstract methods, and read their own checkpoints in one process for export (`holds`,
    `whole_method_state`); bigssl/distributed/engines/__init__.py registers them."""

    kind: ClassVar[str]
    checkpoint_marker: ClassVar[str]  # what of a checkpoint directory shows this engine wrote it, for messages

    def __init__(self, config: Config, env: DistEnv, device: torch.device) -> None:
        self.config = config
        self.env = env
        self.device = device
        precision = config.engine.precision
        if precision == "fp16" and device.type != "cuda" and os.environ.get(CPU_FP16_ENV) != "1":
            raise ConfigError("engine.precision: fp16 needs a GPU (use bf16 or fp32 on CPU)")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        # fp16 needs its loss scaled (bf16 has fp32's exponent range and does not).
        self.scaler = DynamicLossScaler(config.engine.loss_scale_init) if precision == "fp16" else None

    method: Method
    optimizer: torch.optim.Optimizer

    @property
    @abstractmethod
    def capabilities(self) -> Capabilities: ...

    @staticmethod
    @abstractmethod
    def holds(checkpoint: Path) -> bool:
        """Whether `checkpoint` (a checkpoint directory) was written by this engine."""

    @staticmethod
    @abstractmethod
    def whole_method_state(checkpoint: Path) -> dict[str, torch.Tensor]:
        """The method's whole state dict from one of this engine's checkpoints, in one process
        without a process group, every file read without running code from it (export, eval)."""

    def prepare(self, method: Method) -> None:
        """The model changes every engine makes before it wraps or shards the method and builds
        its optimizer: global-batch BatchNorm (`sync_bn`), then the switches that change how the
        backbone runs, not what it computes. Each engine's setup calls this first."""
        if self.config.engine.sync_bn and self.env.distributed:
            # The whole method, EMA teachers and heads alike (as the official code converts the
            # whole model): a teacher keeps its student's parameter names and pairing.
            convert_sync_bn(method)
        backbone = method.backbone
        if self.config.engine.activation_checkpointing:
            if not hasattr(backbone, "set_grad_checkpointing"):
                raise ConfigError(f"engine.activation_checkpointing: {type(backbone).__name__} has no "
                                  "set_grad_checkpointing (timm models do)")
            backbone.set_grad_checkpointing(True)  # its blocks are recomputed in backward
        if self.config.engine.compile:
            if (refusal := self.capabilities.compile_refusal) is not None:
                raise ConfigError(f"engine.compile: not with engine.kind={self.kind} ({refusal}); use ddp or fsdp")
            backbone.compile()  # in place: the module keeps its parameters and state-dict names

    @abstractmethod
    def setup(self, method: Method, optimizer_factory) -> None:
        """Wrap `method` and build its optimizer with `optimizer_factory(module)`."""

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @abstractmethod
    def forward(self, batch: Batch, step: int) -> StepOutput: ...

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self) -> float:
        """Clip, step the optimizer, zero the gradients; returns the pre-clip gradient norm
        (non-finite when an fp16 overflow made the engine skip the step)."""

    def metrics(self) -> dict[str, float]:
        """Engine state worth logging at each log step (the fp16 loss scale)."""
        if self.scaler is None:
            return {}
        return {"loss_scale": self.scaler.scale, "overflow_steps": float(self.scaler.overflow_steps)}

    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.scaler is None else self.scaler.scaled(loss)

    def _clip_and_step(self) -> float:
        """Unscale (fp16), clip and step for engines whose parameters the optimizer sees directly."""
        self._drop_frozen_gradients()
        params = [p for p in self.method.parameters() if p.grad is not None]
        finite = True
        if self.scaler is not None:  # gradients must be true-sized before clipping measures them
            finite = self.scaler.unscale_([self.local_tensor(p.grad) for p in params])
        max_norm = self.config.optim.clip_grad
        per_parameter = self.config.optim.clip_grad_per_parameter
        # clip_grad_norm_ with an infinite limit measures without clipping.
        limit = max_norm if max_norm > 0 and finite and not per_parameter else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2: the norm over every shard
            norm = norm.full_tensor()
        # Non-finite gradients from a finite loss (an overflow in backward) are not applied either;
        # the norm is global, so every rank skips together. (fp16's scaler has decided already.)
        finite = finite and (self.scaler is not None or bool(torch.isfinite(norm)))
        if per_parameter and max_norm > 0 and finite:
            self._clip_each(params, max_norm)
        if finite:
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update(finite)
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def _drop_frozen_gradients(self) -> None:
        """A frozen group's gradients are dropped before clipping, as the official DINO and SwAV
        drop them (p.grad = None), so they count in no norm. (DeepSpeed keeps gradients in its
        own flat buffers: there they still count in the global clipping norm.)"""
        for group in self.optimizer.param_groups:
            if group.get("frozen"):
                for param in group["params"]:
                    param.grad = None

    @torch.no_grad()
    def _clip_each(self, params: list[torch.Tensor], max_norm: float) -> None:
        """g ← g · min(1, max_norm / (‖g‖ + 1e-6)) for each parameter's whole gradient (DINO's
        clipping): squared norms of the local pieces, summed over shards in one collective."""
        grads = [self.local_tensor(p.grad) for p in params]
        squares = torch.stack([g.float().pow(2).sum() for g in grads])
        norms = self.sum_over_shards(squares).sqrt()
        factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, [f.to(g.dtype) for f, g in zip(factors.unbind(), grads, strict=True)])

    def sum_over_shards(self, values: torch.Tensor) -> torch.Tensor:
        """Per-parameter sums of local pieces → sums over whole parameters (identity when
        every rank holds whole parameters)."""
        return values

    def local_tensor(self, param: torch.Tensor) -> torch.Tensor:
        """The part of `param` this rank holds (all of it for replicated engines)."""
        return param.detach()

    @torch.no_grad()
    def ema_update(self, pairs: list[tuple[nn.Module, nn.Module]], momentum: float) -> None:
        """teacher ← m·teacher + (1 − m)·student, parameter by parameter on local tensors: a
        teacher laid out like its student (replicated, or sharded the same way) needs no
        communication. Two fused multi-tensor ops for the whole model."""
        teachers, students = [], []
        for student, teacher in pairs:
            for (name, s), (t_name, t) in zip(student.named_parameters(), teacher.named_parameters(), strict=True):
                s_local, t_local = self.local_tensor(s), self.local_tensor(t)
                if name != t_name or s_local.shape != t_local.shape:
                    raise ValueError(f"EMA pair mismatch: student {name} {tuple(s_local.shape)} vs teacher "
                                     f"{t_name} {tuple(t_local.shape)}")
                students.append(s_local)
                teachers.append(t_local)
        if teachers:
            torch._foreach_mul_(teachers, momentum)
            torch._foreach_add_(teachers, students, alpha=1.0 - momentum)

    @torch.no_grad()
    def normalise_rows(self, params: list[nn.Parameter]) -> None:
        """Rescale every row of each (2-D) parameter to unit norm where it is stored. Replicated
        engines hold whole parameters and FSDP2 shards on dim 0, so each rank holds whole rows
        and needs no communication."""
        for param in params:
            rows = self.local_tensor(param)
            rows.copy_(torch.nn.functional.normalize(rows.float(), dim=1).to(rows.dtype))

    def full_module(self, module: nn.Module) -> nn.Module:
        """`module` with every parameter whole on this rank, for evaluation and export (a
        collective for sharded engines: every rank calls it). Replicated engines return it as is."""
        return module

    @abstractmethod
    def save(self, directory: Path, extra: dict[str, Any]) -> None:
        """Write this engine's state (and `extra`, the trainer's) into `directory`."""

    @abstractmethod
    def load(self, directory: Path) -> dict[str, Any]:
        """Restore state from `directory`; returns the trainer's `extra`."""


@torch.no_grad()
def plain_layout(module: nn.Module) -> None:
    """Give every parameter row-major strides. Sharding engines flatten and view parameters as
    bytes, which channels-last weights refuse; a 1×1 conv weight in channels-last even reports
    is_contiguous() while its last stride is not 1, so compare the strides themselves."""
    for param in module.parameters():
        if param.stride() != torch.empty(param.shape, device="meta").stride():
            param.data = param.data.clone(memory_format=torch.contiguous_format)
