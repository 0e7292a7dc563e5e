"""Per-engine collectives and per-rank memory of one steady-state training step, from a trace.

The method's own collectives come from the trace (bigssl/plan/trace.py); this file adds what
each engine issues around them, as bigssl configures it:
  ddp    gradients all-reduced in buckets (fp32, every trainable parameter once); buffers the
         method does not keep equal itself broadcast from rank 0 before each forward.
  fsdp   FSDP2 units (engines/fsdp.py): each unit's shards all-gathered at each of its forward
         calls, and again for each call's backward (every unit but the root, which stays
         gathered from forward to backward), its gradients reduce-scattered once; dim 0 of every parameter padded to a
         multiple of the world size; the gradient norm all-reduced over shards (one float per
         parameter with a gradient).
  zero1, zero2  gradients all-reduced (DeepSpeed 0.19's bucketed reduction), one scalar
         reduction per optimizer group (its gradient norm), then each group's updated fp32
         partition all-gathered (groups padded to a multiple of 2·world size elements).
  zero3  every parameter's partition (⌈n/W⌉ elements) all-gathered once per step (DeepSpeed's
         default reuse distance keeps them gathered from forward to backward), trainable
         gradients reduce-scattered, one float64 scalar reduction per optimizer group.
Plus the trainer's one per-step vote (finite loss, stop signal: 2 int32 over the CPU group) and,
in fp16 under ddp/fsdp, the loss scaler's overflow vote (1 int32).

LARS (optim.LARS) takes each whole tensor's norms ‖w‖ and ‖g + wd·w‖ (rule lars) or ‖g‖ (larc)
in every group it adapts (`lars_adapt`: weights, unless optim.exclude_bias_norm is off; a
frozen group steps not at all), which costs, per step:
  ddp    nothing: every rank holds whole tensors.
  zero1, zero2  one all-reduce per adapted optimizer group (one flat partition each) of its
         partial sums of squares, a [2, n] fp32 tensor for the group's n parameters: 8·n bytes.
  zero3  the same per sub-group of an adapted group: DeepSpeed cuts a group into sub-groups
         of at least sub_group_size elements of the parameters' partitions (⌈numel/W⌉ each), in
         order, unless the whole group's partitions fit in one (ds_config leaves the default,
         10⁹: one sub-group per group below 10⁹·W elements). 8·(parameters in the sub-group) bytes.
         ZeRO's setup check of the layouts (one int64 all-reduce per partition) is not per step.
         At one rank no partial norm is summed.
  fsdp   each norm is a DTensor pending a sum over the shards, which DTensor all-reduces (one
         element of the parameter's dtype, 4 bytes in fp32) at every op that reads it: `> 0` and
         the trust ratio read both norms (rule lars: 4 all-reduces per adapted parameter), and
         larc's ratio η‖w‖/(‖g‖ + wd‖w‖ + ε) reads ‖w‖ twice (5). Counted on torch 2.14.
tests/test_plan_collectives.py checks every byte against collectives counted at 2 and 4 gloo
ranks, and the memory model against tools/bench_memory.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from bigssl.distributed.collective import Collective
from bigssl.plan.structure import Param, Trace

ENGINES = ("ddp", "zero1", "zero2", "zero3", "fsdp")
OVERRIDES = {"ddp": ["engine.kind=ddp"], "zero1": ["engine.kind=deepspeed", "engine.zero_stage=1"],
             "zero2": ["engine.kind=deepspeed", "engine.zero_stage=2"],
             "zero3": ["engine.kind=deepspeed", "engine.zero_stage=3"], "fsdp": ["engine.kind=fsdp"]}
STATES_PER_PARAMETER = {"adamw": 2, "lars": 1, "sgd": 1}  # fp32 tensors the optimizer keeps per parameter
DEEPSPEED_ALIGNMENT = 2  # DeepSpeed pads each flat group to a multiple of this × the world size
ZERO3_SUB_GROUP_SIZE = 10**9  # DeepSpeed's default zero_optimization.sub_group_size, which ds_config keeps
FSDP_LARS_REDUCTIONS = {"lars": 4, "larc": 5}  # DTensor's norm all-reduces per adapted parameter and step


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def fsdp_shard(param: Param, world: int) -> int:
    """Elements of one rank's FSDP2 shard: dim 0 padded to a multiple of the world size."""
    if not param.shape:
        return ceil_div(1, world)
    return ceil_div(param.shape[0], world) * (param.numel // max(1, param.shape[0]))


def deepspeed_group_numel(numel: int, world: int) -> int:
    return ceil_div(numel, DEEPSPEED_ALIGNMENT * world) * DEEPSPEED_ALIGNMENT * world


def _c(op: str, in_bytes: int, out_bytes: int, purpose: str, group: str = "world") -> Collective:
    return Collective(op, in_bytes, out_bytes, group, purpose)


def engine_collectives(trace: Trace, engine: str, precision: str) -> list[Collective]:
    """What `engine` issues in one step besides the method (see the module docstring)."""
    world, params = trace.world_size, trace.params
    trainable = [p for p in params if p.trainable]
    calls: list[Collective] = [_c("all_reduce", 8, 8, "trainer: per-step vote", "cpu")]
    if precision == "fp16" and engine in ("ddp", "fsdp"):
        calls.append(_c("all_reduce", 4, 4, "loss scaler: overflow vote", "cpu"))
    if world == 1 and engine == "ddp":
        return calls
    if engine == "ddp":
        grads = sum(p.numel * p.element_size for p in trainable)
        calls.append(_c("all_reduce", grads, grads, "DDP: gradient buckets"))
        broadcast = sum(size for name, size in trace.buffers.items() if name not in trace.synchronised_buffers)
        if broadcast:
            calls.append(_c("broadcast", broadcast, broadcast, "DDP: buffers from rank 0"))
    elif engine == "fsdp":
        gathers = fsdp_gathers(trace)
        for unit in range(trace.units):
            members = [p for p in params if p.unit == unit]
            shard = sum(fsdp_shard(p, world) * p.element_size for p in members)
            if not members:
                continue
            grad_shard = sum(fsdp_shard(p, world) * p.element_size for p in members if p.trainable)
            calls += [_c("all_gather", shard, shard * world, "FSDP2: parameters")] * gathers[unit]
            if grad_shard:
                calls.append(_c("reduce_scatter", grad_shard * world, grad_shard, "FSDP2: gradients"))
        calls.append(_c("all_reduce", 4 * len(trainable), 4 * len(trainable), "FSDP2: gradient norm"))
    elif engine in ("zero1", "zero2"):
        grads = sum(p.numel * p.element_size for p in trainable)
        calls.append(_c("all_reduce", grads, grads, "ZeRO: gradient reduction"))
        calls += [_c("all_reduce", 4, 4, "ZeRO: gradient norm per group")] * len(trace.groups)
        for group in trace.groups:
            size = params[group[0]].element_size if group else 4
            padded = deepspeed_group_numel(sum(params[i].numel for i in group), world) * size
            if padded:
                calls.append(_c("all_gather", padded // world, padded, "ZeRO: updated partitions"))
    elif engine == "zero3":
        gathered = sum(ceil_div(p.numel, world) * p.element_size for p in params)
        calls.append(_c("all_gather", gathered, gathered * world, "ZeRO-3: parameters"))
        grads = sum(ceil_div(p.numel, world) * p.element_size for p in trainable)
        calls.append(_c("reduce_scatter", grads * world, grads, "ZeRO-3: gradients"))
        calls += [_c("all_reduce", 8, 8, "ZeRO-3: gradient norm per group")] * len(trace.groups)
    else:
        raise ValueError(f"unknown engine {engine!r}; one of {', '.join(ENGINES)}")
    return calls + lars_collectives(trace, engine)


def lars_collectives(trace: Trace, engine: str) -> list[Collective]:
    """What LARS's whole-tensor norms cost in one step under `engine` (the module docstring)."""
    world, params = trace.world_size, trace.params
    adapted = [trace.groups[i] for i in trace.lars_groups]
    if engine == "fsdp":
        per_parameter = FSDP_LARS_REDUCTIONS[trace.lars_rule]
        return [_c("all_reduce", params[i].element_size, params[i].element_size, "LARS: DTensor norm reductions")
                for group in adapted for i in group if params[i].trainable for _ in range(per_parameter)]
    if engine not in ("zero1", "zero2", "zero3") or world == 1:
        return []
    if engine == "zero3":
        adapted = [sub for group in adapted
                   for sub in zero3_sub_groups([ceil_div(params[i].numel, world) for i in group])]
    return [_c("all_reduce", 8 * len(group), 8 * len(group), "LARS: norms per partition")
            for group in adapted if group]


def zero3_sub_groups(partitions: list[int], sub_group_size: int = ZERO3_SUB_GROUP_SIZE) -> list[list[int]]:
    """DeepSpeed ZeRO-3's sub-groups of one optimizer group (stage3._create_fp16_sub_groups), as
    lists of positions in the group, from each parameter's partition numel: the whole group if
    its partitions fit in `sub_group_size` elements, else cut after each parameter that brings the
    running sum to at least `sub_group_size`."""
    if sub_group_size >= sum(partitions):
        return [list(range(len(partitions)))]
    groups: list[list[int]] = [[]]
    running = 0
    for index, numel in enumerate(partitions):
        groups[-1].append(index)
        running += numel
        if running >= sub_group_size and index < len(partitions) - 1:
            groups.append([])
            running = 0
    return groups


def fsdp_gathers(trace: Trace) -> list[int]:
    """All-gathers of each unit in one step, replaying FSDP2's schedule over the traced calls:
    a unit is gathered at each forward call and resharded after it (the root stays gathered);
    in backward, each call that needs a gradient (latest first) gathers its unit if sharded,
    then prefetches the unit of the call before it in forward order, which costs a gather even
    for a unit without gradients (an EMA teacher run just before); a unit is resharded after its
    backward, and everything at the end of the step."""
    root = trace.units - 1
    gathers = [0] * trace.units
    gathered = [False] * trace.units
    for unit, _ in trace.unit_calls:
        if not gathered[unit]:
            gathers[unit] += 1
        gathered[unit] = unit == root
    for index in range(len(trace.unit_calls) - 1, -1, -1):
        unit, backward = trace.unit_calls[index]
        if not backward:
            continue
        for target in (unit, trace.unit_calls[index - 1][0]) if index else (unit,):
            if not gathered[target]:
                gathers[target] += 1
                gathered[target] = True
        if unit != root:
            gathered[unit] = False
    return gathers


@dataclass
class Memory:
    """Bytes one rank holds through the step."""

    parameters: int
    gradients: int
    optimizer: int
    master: int  # fp32 copies an engine keeps besides the parameters
    buffers: int
    activations: int
    gathered: int  # parameters gathered whole for the step on a sharding engine, at the peak

    @property
    def total(self) -> int:
        return (self.parameters + self.gradients + self.optimizer + self.master + self.buffers + self.activations
                + self.gathered)


def engine_memory(trace: Trace, engine: str, optimizer: str, precision: str) -> Memory:
    world, params = trace.world_size, trace.params
    trainable = [p for p in params if p.trainable]
    states = STATES_PER_PARAMETER.get(optimizer, 2)
    full = sum(p.numel * p.element_size for p in params)
    grads = sum(p.numel * p.element_size for p in trainable)
    buffers = sum(trace.buffers.values())
    if engine == "ddp":
        return Memory(full, grads, states * 4 * sum(p.numel for p in trainable), 0, buffers, trace.activation_bytes, 0)
    if engine == "fsdp":
        shard = sum(fsdp_shard(p, world) * p.element_size for p in params)
        grad_shard = sum(fsdp_shard(p, world) * p.element_size for p in trainable)
        unit_bytes = [sum(p.numel * p.element_size for p in params if p.unit == u) for u in range(trace.units)]
        root = unit_bytes.pop()
        # The root stays gathered through the step; one more unit is gathered while the next is
        # prefetched (forward), and its unsharded gradients wait for their reduce-scatter.
        peak = root + sum(sorted(unit_bytes)[-2:]) + (max(unit_bytes) if unit_bytes else 0)
        return Memory(shard, grad_shard, states * 4 * sum(fsdp_shard(p, world) for p in trainable), 0, buffers,
                      trace.activation_bytes, peak)
    grouped = {i for group in trace.groups for i in group}
    if engine in ("zero1", "zero2"):
        # Each optimizer group is one flat buffer, padded; rank r owns the r-th 1/W of each. At
        # both stages DeepSpeed 0.19 keeps only the owned part of the gradients between steps.
        padded = [deepspeed_group_numel(sum(params[i].numel for i in group), world) for group in trace.groups]
        partition = sum(padded) // world
        flat = sum(n * params[g[0]].element_size for n, g in zip(padded, trace.groups, strict=True) if g)
        others = sum(p.numel * p.element_size for i, p in enumerate(params) if i not in grouped)
        return Memory(flat + others, 4 * partition, states * 4 * partition, 4 * partition, buffers,
                      trace.activation_bytes, 0)
    # ZeRO-3: every parameter cut into ⌈n/W⌉-element partitions; the gradient reduction bucket
    # is allocated whole up front (engines/deepspeed_zero.ds_config sizes it).
    bucket = int(min(5e8, max(1e6, sum(p.numel for p in params) // 16)))
    shards = sum(ceil_div(p.numel, world) * p.element_size for p in params)
    owned = sum(ceil_div(params[i].numel, world) for i in grouped)
    master = 4 * owned if precision == "fp16" else 0  # fp32 masters share the parameters' storage
    return Memory(shards, 4 * sum(ceil_div(p.numel, world) for p in trainable) + 4 * bucket, states * 4 * owned,
                  master, buffers, trace.activation_bytes, full)
