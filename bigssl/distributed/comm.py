"""Collectives used by losses, methods and evaluation, each with its autograd behaviour stated.

Every helper is a no-op (identity) when no process group is up, so the same code runs in one
process and in many.

`simulated(world_size)` makes one process act as rank 0 of `world_size` ranks without any
process group: every collective returns a tensor of the shape and dtype the real one would
(gathers repeat the local rows; reductions leave values as they are) and is recorded, backward
included. The capacity planner (bigssl/plan) runs a method's step on meta tensors this way to
learn which collectives it makes, of what size, at any world size.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

# The differentiable collectives: torch.distributed.nn.functional is deprecated in their favour
# (torch 2.14 warns on every call). Their backward is registered on the ops themselves:
# all_gather_into_tensor ↦ reduce_scatter SUM, all_reduce SUM ↦ all_reduce SUM.
import torch.distributed._functional_collectives as funcol

from bigssl.distributed.collective import Collective

_cpu_group: dist.ProcessGroup | None = None  # gloo group for CPU-side collectives under NCCL


@dataclass
class _Simulation:
    world_size: int
    record: Callable[[Collective], None]


_simulation: _Simulation | None = None


@contextlib.contextmanager
def simulated(world_size: int, record: Callable[[Collective], None]) -> Iterator[None]:
    """Act as rank 0 of `world_size` ranks, with no process group: see the module docstring."""
    global _simulation
    if is_distributed():
        raise RuntimeError("comm.simulated: a process group is up; simulate in a process without one")
    previous, _simulation = _simulation, _Simulation(world_size, record)
    try:
        yield
    finally:
        _simulation = previous


def _caller() -> str:
    """The first function outside this module on the stack: what a simulated collective is for."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back
    if frame is None:
        return ""
    return f"{frame.f_globals.get('__name__', '?')}.{frame.f_code.co_qualname}"


def _note(op: str, x: torch.Tensor, out_bytes: int, group: str = "world", purpose: str = "") -> None:
    size = x.numel() * x.element_size()
    _simulation.record(Collective(op, size, out_bytes if out_bytes >= 0 else size, group, purpose or _caller()))


def _noted_backward(out: torch.Tensor, op: str, purpose: str) -> torch.Tensor:
    """Record the collective that the backward of a differentiable gather or sum makes, when
    (and only if) a gradient arrives."""
    if out.requires_grad:
        world = _simulation.world_size

        def hook(grad: torch.Tensor) -> None:
            size = grad.numel() * grad.element_size()
            _simulation.record(Collective(op, size, size // world if op == "reduce_scatter" else size, "world",
                                          purpose + " (backward)"))

        out.register_hook(hook)
    return out


def set_cpu_group(group: dist.ProcessGroup | None) -> None:
    """Called once by env.init: where small CPU tensors and Python objects travel."""
    global _cpu_group
    _cpu_group = group


def is_distributed() -> bool:
    if _simulation is not None:
        return _simulation.world_size > 1
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    if _simulation is not None:
        return _simulation.world_size
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    if _simulation is not None:
        return 0
    return dist.get_rank() if is_distributed() else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0, differentiably.

    Backward sums the incoming gradient over ranks and returns this rank's slice, so a loss
    computed on the gathered tensor sends ∂L_r'/∂x_r from every rank r' back to x_r. A plain
    `dist.all_gather` has no backward at all: every rank would miss the gradient that the other
    ranks' anchors put on its samples (tests/test_distributed_loss.py shows the wrong gradient).
    """
    if not is_distributed():
        return x
    if _simulation is not None:
        purpose = _caller()
        _note("all_gather", x, x.numel() * x.element_size() * world_size(), purpose=purpose)
        return _noted_backward(torch.cat([x] * world_size()), "reduce_scatter", purpose)
    gathered = funcol.all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD)
    return funcol.wait_tensor(gathered)  # a plain tensor, not an AsyncCollectiveTensor, for the caller


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0 with no gradient (keys, queue entries, features)."""
    if not is_distributed():
        return x.detach()
    if _simulation is not None:
        _note("all_gather", x, x.numel() * x.element_size() * world_size())
        return torch.cat([x.detach()] * world_size())
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def gather_variable(x: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors whose first dimension differs between ranks (no gradient)."""
    if not is_distributed():
        return x.detach()
    shapes = all_gather_object(tuple(x.shape))
    if x.shape[0] == 0:  # a rank with nothing may not know the other dimensions: take them from the others
        trailing = next((shape[1:] for shape in shapes if shape[0] > 0), tuple(x.shape[1:]))
        x = x.new_zeros((0, *trailing))
    sizes = [shape[0] for shape in shapes]
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x.detach()
    gathered = gather_no_grad(padded).split(max(sizes))
    return torch.cat([part[:n] for part, n in zip(gathered, sizes, strict=True)], dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, no gradient (for logging and statistics)."""
    if not is_distributed():
        return x.detach()
    out = x.detach().clone()
    _all_reduce_(out)
    return out / world_size()


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, differentiably: backward sums the incoming gradient over ranks too. When
    every rank computes the same loss from the sum (Barlow Twins' cross-correlation, global batch
    statistics), each rank's gradient is W × the single-process one for its samples, and the
    engine's average over ranks brings it back to exactly the single-process gradient."""
    if not is_distributed():
        return x
    if _simulation is not None:
        purpose = _caller()
        _note("all_reduce", x, -1, purpose=purpose)
        return _noted_backward(x.clone(), "all_reduce", purpose)
    return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), "sum", dist.group.WORLD))


def all_reduce_sum_no_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum over the ranks of `group` (all of them by default) with no gradient (Sinkhorn
    marginals, centres, statistics, LARS's partial norms under ZeRO)."""
    if not is_distributed():
        return x.detach()
    out = x.detach().clone()
    _all_reduce_(out, group=group)
    return out


def all_reduce_max_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return x.detach()
    out = x.detach().clone()
    _all_reduce_(out, dist.ReduceOp.MAX)
    return out


def all_reduce_sum_cpu(x: torch.Tensor) -> torch.Tensor:
    """Sum of a small CPU tensor over ranks (counters); no gradient."""
    if not is_distributed():
        return x.clone()
    out = x.detach().clone()
    _all_reduce_(out, cpu=True)
    return out


def all_agree(flag: bool) -> bool:
    """True only if `flag` is true on every rank (e.g. 'I still have a batch')."""
    if not is_distributed():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    _all_reduce_(value, dist.ReduceOp.MIN, cpu=True)
    return bool(value.item())


def agree(every: bool, some: bool) -> tuple[bool, bool]:
    """(`every` is true on every rank, `some` is true on some rank), in one small collective: the
    per-step vote of the trainer (the loss is finite everywhere; a stop signal came somewhere)."""
    if not is_distributed():
        return every, some
    value = torch.tensor([1 if every else 0, 0 if some else 1], dtype=torch.int32)
    _all_reduce_(value, dist.ReduceOp.MIN, cpu=True)
    return bool(value[0]), not bool(value[1])


def all_gather_object(obj: object) -> list[object]:
    if not is_distributed():
        return [obj]
    if _simulation is not None:  # objects travel only at log and checkpoint steps: not recorded
        return [obj] * world_size()
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj, group=_cpu_group)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    if not is_distributed() or _simulation is not None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_norm_statistics(module: torch.nn.Module) -> None:
    """Every rank's BatchNorm running statistics become rank 0's. Each rank updates them from
    its own batches and no engine keeps them equal (DDP re-broadcasts only at its next forward;
    DCP keeps one rank's copy, not necessarily rank 0's): an evaluation that embeds the train set
    on one rank and the val set on another scores no one network, and a checkpoint would hold
    statistics the exported backbone does not. Other buffers (queues, banks, centres) are kept
    equal by the methods that own them."""
    if not is_distributed() or _simulation is not None:
        return
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._NormBase) and layer.track_running_stats:
            for buffer in (layer.running_mean, layer.running_var, layer.num_batches_tracked):
                if buffer is not None:
                    dist.broadcast(buffer, src=0)


def barrier() -> None:
    if is_distributed() and _simulation is None:
        dist.barrier()


def _all_reduce_(x: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM, cpu: bool = False,
                 group: dist.ProcessGroup | None = None) -> None:
    """In place over every rank of `group` (default all; `cpu`: through the CPU-side group);
    under simulation the values stay as they are and the call is recorded."""
    if _simulation is not None:
        _note("all_reduce", x, -1, "cpu" if cpu else "world" if group is None else "other")
        return
    dist.all_reduce(x, op=op, group=_cpu_group if cpu else group)
