"""One training step of a recipe's method on the meta device, as rank 0 of N ranks.

Meta tensors have shapes and dtypes and no storage: nothing is computed or allocated. The
method is the real one (bigssl.methods), built from the recipe, fed the batch shapes of its view
policy, under `comm.simulated(N)`. What comes out:
  - every collective the method makes (gathered negatives, shuffle-BN, Sinkhorn and centre
    reductions, memory-bank writes, global BatchNorm), forward and backward, in bytes;
  - the step's FLOPs (torch.utils.flop_counter, forward and backward);
  - the bytes autograd saves for backward (activations), each storage once;
  - the parameter, buffer and optimizer-group structure the engine models need, and which
    groups LARS adapts (their trust ratios take collectives under the sharding engines).
Autocast has no meta kernels, so bf16/fp16 recipes run under `_LowPrecisionMatmuls`, which casts
the inputs of the matrix products and convolutions as CUDA's autocast does (above autograd, so
autograd saves the low-precision copies, one copy of each weight per step, as autocast's cache
keeps). Every loss here casts to float32 before it gathers, so collective sizes do not depend on it.
"""

from __future__ import annotations

import contextlib
import copy
import random
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from bigssl.config import Config
from bigssl.distributed import comm
from bigssl.distributed.collective import Collective
from bigssl.plan.structure import Param, Trace

if TYPE_CHECKING:
    from bigssl.methods.base import Method

IMAGENET_SAMPLES = 1_281_167  # the planner's dataset size when the recipe does not give one


class _ReadValues(TorchDispatchMode):
    """Meta tensors have no values; code that reads one (a memory bank's bounds check, a queue
    pointer, whether NCE's normaliser is set yet) gets 1 for a float and 0 for an integer or a
    flag: the steady state of a run past its first steps. Real tensors (timm's drop-path rates,
    made on the CPU) keep their values."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return 1.0 if args[0].dtype.is_floating_point else 0
        return func(*args, **(kwargs or {}))


_TORCH_LINEAR = torch._C._nn.linear  # what torch.nn.functional.linear is, unless something replaced it
_LOW_PRECISION_OPS = {_TORCH_LINEAR, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, torch.matmul, torch.mm,
                      torch.bmm, torch.addmm, torch.baddbmm, torch.einsum, F.scaled_dot_product_attention,
                      torch.Tensor.matmul, torch.Tensor.__matmul__}


class _LowPrecisionMatmuls(TorchFunctionMode):
    """CUDA autocast's main rule on any device: float32 inputs of matrix products, convolutions
    and attention become `dtype`; everything else runs in the dtype it is given."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        # One cast per weight (autocast's weight cache), kept beside the weight itself: an id is
        # unique only while its object lives.
        self.weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cast(self, x):
        if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
            # autocast's rule for its cache: a leaf that requires grad and is no view. A view of a
            # weight made under no_grad (a custom autograd.Function's `weight.t()`) is such a leaf
            # too, but a temporary: its id is reused by the next one, of another shape.
            if x.is_leaf and x.requires_grad and x._base is None:
                if id(x) not in self.weights:
                    self.weights[id(x)] = (x, x.to(self.dtype))
                return self.weights[id(x)][1]
            return x.to(self.dtype)
        if isinstance(x, list | tuple):
            return type(x)(self._cast(y) for y in x)
        return x

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOW_PRECISION_OPS:
            args, kwargs = self._cast(args), {k: self._cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextlib.contextmanager
def _torch_linear():
    """torch's own F.linear for the trace's length. DeepSpeed's ZeRO-3 replaces
    torch.nn.functional.linear for the rest of the process with its autograd.Function
    (zero3_linear_wrap: memory_efficient_linear), which saves the float32 input where torch's
    saves the cast one, so a trace after a ZeRO-3 engine in the same process would count other
    activations than `bigssl plan` alone does."""
    current = F.linear
    F.linear = _TORCH_LINEAR
    try:
        yield
    finally:
        F.linear = current


def view_shapes(config: Config) -> list[tuple[int, int, int, int]]:
    """(views, channels, height, width) of each view group the photometric half hands over."""
    from bigssl.data.views import Geometry, group_specs

    image = torch.randint(0, 256, (3, 256, 320), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    shapes = []
    for spec, group in zip(group_specs(config.data.views), Geometry(config.data.views)(image, random.Random(0)),
                           strict=True):
        count, height, width = group.shape[0], group.shape[-2], group.shape[-1]
        # Lab (CMC) is split into its L and ab planes, two views.
        shapes += [(count, 1, height, width), (count, 2, height, width)] if spec.output == "lab" else \
            [(count, 3, height, width)]
    return shapes


def _structure(method: torch.nn.Module, config: Config, step: int
               ) -> tuple[list[Param], list[list[int]], list[int], list[torch.nn.Module]]:
    from bigssl.distributed.engines.fsdp import shard_units
    from bigssl.optim import GroupSettings, param_groups

    units = [*reversed(shard_units(method)), method]  # fully_shard's order: innermost first, root last
    owner: dict[int, int] = {}
    for index, unit in enumerate(units):
        for param in unit.parameters():
            owner.setdefault(id(param), index)  # a parameter belongs to the innermost unit holding it
    params, index_of = [], {}
    for name, param in method.named_parameters():
        index_of[id(param)] = len(params)
        params.append(Param(name, tuple(param.shape), param.element_size(), param.requires_grad, owner[id(param)]))
    groups = param_groups(method, config.optim, config.eval.online_probe_lr, method.param_rules())
    # A frozen group is left out of the step (train.py marks it, optim.skipping_frozen_groups).
    lars = [i for i, group in enumerate(groups) if config.optim.name == "lars" and group["lars_adapt"]
            and not step < GroupSettings.of(group).frozen_steps]
    return params, [[index_of[id(p)] for p in group["params"]] for group in groups], lars, units


def _record_calls(units: list[torch.nn.Module], calls: list[tuple[int, bool]]) -> None:
    """FSDP2 gathers a unit at each of its forward calls (a backbone run once per view group runs
    once per group) and prefetches in backward by this order (bigssl/plan/engines.py)."""
    for index, unit in enumerate(units[:-1]):  # the root's call is appended after the forward
        trainable = any(p.requires_grad for p in unit.parameters())

        def hook(module, args, index=index, trainable=trainable) -> None:
            inputs = any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
            calls.append((index, torch.is_grad_enabled() and (trainable or inputs)))

        unit.register_forward_pre_hook(hook)


def _built_method(config: Config, steps_per_epoch: int, samples: int, world_size: int) -> Method:
    """The method as the trainer builds it, with the model changes its engine makes first."""
    from bigssl.distributed.global_bn import convert_sync_bn
    from bigssl.methods import build as build_method
    from bigssl.methods.context import RunContext

    torch.manual_seed(config.seed)
    method = build_method(config, RunContext.of(config, world_size=world_size, steps_per_epoch=steps_per_epoch,
                                                total_steps=config.optim.epochs * steps_per_epoch,
                                                num_samples=samples))
    if config.engine.sync_bn and world_size > 1:
        convert_sync_bn(method)
    if config.engine.activation_checkpointing:
        method.backbone.set_grad_checkpointing(True)
    return method


class _SavedForBackward:
    """The bytes of the tensors autograd saves for backward that are not the method's own
    parameters, each storage counted once (`pack` is the saved-tensors pack hook)."""

    def __init__(self, method: torch.nn.Module) -> None:
        self.own = {p.untyped_storage()._cdata for p in method.parameters()}
        self.saved: dict[int, int] = {}
        # Every saved storage kept alive, so that no address is reused and counted twice.
        self.held: list[torch.UntypedStorage] = []

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in self.own:
            self.saved[storage._cdata] = storage.nbytes()
            self.held.append(storage)
        return tensor

    def bytes(self) -> int:
        return sum(self.saved.values())


def trace(config: Config, world_size: int, samples: int | None = None, step: int | None = None) -> Trace:
    """The step of `config` as rank 0 of `world_size` ranks sees it (see the module docstring);
    `step` defaults to one past the first two epochs' special cases (frozen layers, queue start)."""
    from torch.utils.flop_counter import FlopCounterMode

    from bigssl import config as config_lib

    local_batch = config_lib.per_rank_batch(config, world_size)
    config = copy.deepcopy(config)
    config.model.channels_last = False  # a memory layout changes neither bytes nor FLOPs
    shapes = view_shapes(config)
    samples = samples or config.data.samples_per_epoch or IMAGENET_SAMPLES
    steps_per_epoch = max(1, samples // config.optim.batch_size)
    step = 2 * steps_per_epoch if step is None else step
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.engine.precision)
    calls: list[Collective] = []
    with _torch_linear(), torch.device("meta"), _ReadValues(), comm.simulated(world_size, calls.append):
        method = _built_method(config, steps_per_epoch, samples, world_size)
        params, groups, lars_groups, units = _structure(method, config, step)
        unit_calls: list[tuple[int, bool]] = []
        _record_calls(units, unit_calls)
        buffers = {name: b.numel() * b.element_size() for name, b in method.named_buffers()}
        saved = _SavedForBackward(method)
        batch = {"views": [torch.empty((v, local_batch, c, h, w)) for v, c, h, w in shapes],
                 "label": torch.zeros(local_batch, dtype=torch.long), "id": torch.arange(local_batch),
                 "text": ["a photo of a thing"] * local_batch}
        method.train()
        with FlopCounterMode(display=False) as flops:
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                if low is not None:
                    with _LowPrecisionMatmuls(low):
                        out = method(batch, step)
                else:
                    out = method(batch, step)
            activation_bytes = saved.bytes()
            unit_calls.append((len(units) - 1, True))
            out.loss.backward()
            method.after_step(step)
    return Trace(world_size=world_size, local_batch=local_batch, params=params, buffers=buffers,
                 synchronised_buffers=list(method.synchronised_buffers()), groups=groups, units=len(units),
                 unit_calls=unit_calls, collectives=calls,
                 flops=int(flops.get_total_flops()), activation_bytes=activation_bytes,
                 ema=bool(method.ema_pairs()), lars_groups=lars_groups, lars_rule=config.optim.lars_rule)
