"""DeepSpeed ZeRO checkpoints merged into one state dict, in one process and without DeepSpeed:
what `DeepSpeedEngine.whole_method_state` returns for `bigssl export` and `bigssl eval`.

DeepSpeed's own merger (zero_to_fp32) unpickles with weights_only=False, so the ZeRO partitions
are merged here, from files read weights-only (safe_load.py), at any stage, fp32 master weights.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from bigssl.distributed.engines.safe_load import load_deepspeed_file
from bigssl.errors import CheckpointError

OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
MODEL_FILE_Z12 = "mp_rank_00_model_states.pt"  # stages 1-2: one model file, whole frozen params
MODEL_FILE_Z3 = "zero_pp_rank_{}_mp_rank_00_model_states.pt"  # stage 3: one per rank, each a fragment


def zero_state(zero_dir: Path) -> dict[str, torch.Tensor]:
    """Buffers, frozen parameters and the fp32 masters of the trainable ones, whole.

    The layout (DeepSpeed 0.17-0.19): each rank's `*_optim_states.pt` holds, per parameter group,
    one flat fp32 tensor. Stages 1-2 cut the group's concatenated parameters (each followed by
    its alignment padding, if listed) into equal consecutive partitions, one per rank; stage 3
    cuts every parameter into `ceil(numel / world)` elements per rank, the last one padded, and
    a rank's flat group is its pieces in parameter order. Parameter names and shapes, buffers and
    frozen parameters are in the model-states file(s)."""
    optim = _optimizer_states(zero_dir)
    stage = int(optim[0]["zero_stage"])
    world = len(optim)
    model_files = [MODEL_FILE_Z12] if stage < 3 else [MODEL_FILE_Z3.format(r) for r in range(world)]
    models = [_read(zero_dir / name) for name in model_files]
    head, state = models[0], _buffers(models[0])
    state.update(_frozen(models, stage))
    groups = [list(g.items()) for g in head["param_shapes"]]
    flat_key = "single_partition_of_fp32_groups" if stage < 3 else "fp32_flat_groups"
    per_rank = [o[flat_key] for o in optim]
    paddings = optim[0].get("param_alignment_paddings")
    for g, shapes in enumerate(groups):
        parts = [flat[g] for flat in per_rank]
        where = f"{zero_dir}: parameter group {g}"
        if stage < 3:
            state.update(_unpartitioned(torch.cat(parts), shapes, paddings[g] if paddings else None, world, where))
        else:
            state.update(_interleaved(parts, shapes, where))
    for name, source in head.get("shared_params", {}).items():
        if source in state:
            state[name] = state[source]
    return state


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    return load_deepspeed_file(path)


def _optimizer_states(zero_dir: Path) -> list[dict[str, Any]]:
    """Every rank's optimizer partition (the optimizer's own state dropped), in rank order."""
    files = {int(m.group(1)): zero_dir / p.name for p in zero_dir.iterdir() if (m := OPTIM_FILE.match(p.name))}
    if not files or sorted(files) != list(range(len(files))):
        raise CheckpointError(f"{zero_dir}: optimizer partitions of ranks {sorted(files)} (expected 0..N-1)")
    states = []
    for rank in range(len(files)):
        content = _read(files[rank])["optimizer_state_dict"]
        content.pop("optimizer_state_dict", None)  # momenta etc.: not weights
        content.pop("base_optimizer_state", None)
        states.append(content)
    count = states[0].get("partition_count")
    count = max(count) if isinstance(count, list) else count
    if count != len(files):
        raise CheckpointError(f"{zero_dir}: {len(files)} optimizer partitions, the checkpoint says {count}")
    return states


def _buffers(model: dict[str, Any]) -> dict[str, torch.Tensor]:
    names = set(model["buffer_names"])
    return {k: v.float() if v.is_floating_point() else v for k, v in model["module"].items() if k in names}


def _frozen(models: list[dict[str, Any]], stage: int) -> dict[str, torch.Tensor]:
    """Parameters without gradients (EMA teachers): whole in stages 1-2, one fragment per rank in 3."""
    shapes = models[0].get("frozen_param_shapes") or {}
    if stage < 3:
        return {name: models[0]["frozen_param_fragments"][name] for name in shapes}
    return {name: torch.cat([m["frozen_param_fragments"][name] for m in models])[: math.prod(shape)].view(shape)
            for name, shape in shapes.items()}


def _unpartitioned(flat: torch.Tensor, shapes: list[tuple[str, torch.Size]], paddings: list[int] | None,
                   world: int, where: str) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for i, (name, shape) in enumerate(shapes):
        numel = math.prod(shape)
        # A copy, not a view into the flat group: safetensors refuses tensors that share storage.
        out[name] = flat[offset: offset + numel].view(shape).clone()
        offset += numel + (paddings[i] if paddings else 0)
    # What is left over is the group's alignment padding (to 2·world elements, since DeepSpeed
    # 0.10): more means the shapes do not describe this flat tensor.
    if not 0 <= flat.numel() - offset < 2 * world:
        raise CheckpointError(f"{where}: the parameters take {offset} of {flat.numel()} elements")
    return out


def _interleaved(parts: list[torch.Tensor], shapes: list[tuple[str, torch.Size]], where: str
                 ) -> dict[str, torch.Tensor]:
    out, offset, world = {}, 0, len(parts)
    for name, shape in shapes:
        numel = math.prod(shape)
        piece = math.ceil(numel / world)
        out[name] = torch.cat([p[offset: offset + piece] for p in parts])[:numel].view(shape)
        offset += piece
    if offset != parts[0].numel():
        raise CheckpointError(f"{where}: the parameters take {offset} of {parts[0].numel()} elements per rank")
    return out
