"""Backbone weights as one safetensors file (timm's state-dict layout, no head)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from bigssl.checkpoint import Checkpointer
from bigssl.errors import UserError


def save_backbone(backbone: nn.Module, path: Path) -> None:
    save_tensors(backbone.state_dict(), path)


def save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    tensors = {name: t.detach().cpu().contiguous() for name, t in state.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "bigssl"})
    os.replace(tmp, path)


def checkpoint_dir(run_or_checkpoint: Path) -> Path:
    """A run directory means its newest published checkpoint; a checkpoint directory itself."""
    if (run_or_checkpoint / "checkpoints").is_dir():
        latest = Checkpointer(run_or_checkpoint, keep=1, is_main=False).latest()
        if latest is None:
            raise UserError(f"{run_or_checkpoint}: the run has no published checkpoint")
        return latest
    if not run_or_checkpoint.is_dir():
        raise UserError(f"{run_or_checkpoint}: no such run or checkpoint directory")
    return run_or_checkpoint


def export_backbone(run_or_checkpoint: Path, out: Path) -> tuple[Path, int]:
    """Write the backbone of any engine's checkpoint as one safetensors file; returns the
    checkpoint used and the number of tensors written."""
    from bigssl.distributed.engines.consolidate import backbone_state

    checkpoint = checkpoint_dir(run_or_checkpoint)
    try:
        state = backbone_state(checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from err
    save_tensors(state, out)
    return checkpoint, len(state)
