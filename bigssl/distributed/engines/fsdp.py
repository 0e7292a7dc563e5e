"""FSDP2 (`torch.distributed.fsdp.fully_shard`): every parameter, gradient and optimizer state
sharded on dim 0 over the ranks; parameters are all-gathered per unit for its forward and
backward and freed again.

Units are the members of the model's module lists and sequences (transformer blocks, ResNet
bottlenecks, head layers), then the method as a whole for what is left. An EMA teacher goes
through the same rule, so each teacher parameter is sharded exactly like its student's and the
EMA runs on local shards without communication. Checkpoints are torch.distributed.checkpoint
(DCP) directories, which load at any world size.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from bigssl.distributed import comm
from bigssl.distributed.engines import dcp_safe
from bigssl.distributed.engines.base import Capabilities, Engine, plain_layout
from bigssl.distributed.engines.safe_load import load_tensors
from bigssl.methods.base import Batch, Method, StepOutput

DCP_DIR = "dcp"
EXTRA_FILE = "extra.pt"


def shard_units(module: nn.Module) -> list[nn.Module]:
    """Members of nn.ModuleList / nn.Sequential containers that hold parameters, outermost first
    (a unit is not searched further)."""
    units = []
    for child in module.children():
        if isinstance(module, nn.ModuleList | nn.Sequential) and any(True for _ in child.parameters()):
            units.append(child)
        else:
            units.extend(shard_units(child))
    return units


def _ensure_process_group() -> None:
    """FSDP2 needs a process group even alone (a resumed run may have one rank): a private one."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


class FSDPEngine(Engine):
    kind = "fsdp"
    capabilities = Capabilities(holds_whole_parameters=False)
    checkpoint_marker = f"{DCP_DIR}/"

    @staticmethod
    def holds(checkpoint: Path) -> bool:
        return (checkpoint / DCP_DIR / dcp_safe.METADATA).is_file()

    @staticmethod
    def whole_method_state(checkpoint: Path) -> dict[str, torch.Tensor]:
        return dcp_safe.read_model_state(checkpoint / DCP_DIR)

    def setup(self, method: Method, optimizer_factory) -> None:
        _ensure_process_group()
        method.to(self.device)
        self.prepare(method)
        plain_layout(method)  # inputs may stay channels-last
        # An unsharded skeleton of the backbone (no storage) to rebuild it whole for evaluation.
        self._skeletons = {id(method.backbone): copy.deepcopy(method.backbone).to("meta")}
        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        for unit in reversed(shard_units(method)):  # innermost first
            fully_shard(unit, mesh=mesh)
        fully_shard(method, mesh=mesh)
        self.method = method
        self.optimizer = optimizer_factory(method)

    def forward(self, batch: Batch, step: int) -> StepOutput:
        with self.autocast():
            return self.method(batch, step)

    def backward(self, loss: torch.Tensor) -> None:
        self._scaled(loss).backward()  # gradients are reduce-scattered (averaged over ranks) unit by unit

    def step(self) -> float:
        return self._clip_and_step()

    def sum_over_shards(self, values: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce_sum_no_grad(values)  # every parameter is sharded over all ranks

    def local_tensor(self, param: torch.Tensor) -> torch.Tensor:
        return param.to_local() if isinstance(param, DTensor) else param.detach()

    def full_module(self, module: nn.Module) -> nn.Module:
        skeleton = self._skeletons.get(id(module))
        if skeleton is None:
            raise ValueError("FSDPEngine.full_module: only the method's backbone has a skeleton")
        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
        whole = copy.deepcopy(skeleton).to_empty(device=self.device)
        whole.load_state_dict(state)
        return whole

    def _state(self) -> dict[str, Any]:
        model, optimizer = get_state_dict(self.method, self.optimizer)
        return {"model": model, "optimizer": optimizer}

    def save(self, directory: Path, extra: dict[str, Any]) -> None:
        dcp.save(self._state(), checkpoint_id=str(directory / DCP_DIR))
        if self.env.is_main:
            scale = {} if self.scaler is None else {"loss_scale": self.scaler.state_dict()}
            with open(directory / EXTRA_FILE, "wb") as handle:  # a full disk raises OSError(ENOSPC)
                torch.save({"extra": extra, **scale}, handle)

    def load(self, directory: Path) -> dict[str, Any]:
        state = self._state()
        dcp_safe.load(state, directory / DCP_DIR)  # checked metadata, weights-only entries
        set_state_dict(self.method, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        saved = load_tensors(directory / EXTRA_FILE)
        if self.scaler is not None and "loss_scale" in saved:
            self.scaler.load_state_dict(saved["loss_scale"])
        return saved["extra"]
