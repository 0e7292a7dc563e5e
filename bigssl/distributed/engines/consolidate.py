"""One whole state dict of the method from any engine's checkpoint directory, in one process
and without a process group: what `bigssl export` writes out.

DDP: `state.pt`; FSDP2: a DCP directory (`dcp/`); DeepSpeed: its `zero/` layout, merged with
its own zero_to_fp32 (any stage, fp32 master weights).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bigssl.distributed.engines import ddp, deepspeed_zero, fsdp


def engine_of(checkpoint: Path) -> str:
    if (checkpoint / ddp.STATE_FILE).is_file():
        return "ddp"
    if (checkpoint / fsdp.DCP_DIR / ".metadata").is_file():
        return "fsdp"
    if (checkpoint / deepspeed_zero.TAG).is_dir():
        return "deepspeed"
    raise FileNotFoundError(f"{checkpoint}: not a bigssl checkpoint (no state.pt, dcp/ or zero/)")


def method_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    kind = engine_of(checkpoint)
    if kind == "ddp":
        return torch.load(checkpoint / ddp.STATE_FILE, map_location="cpu", weights_only=True)["method"]
    if kind == "fsdp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            merged = Path(tmp) / "merged.pt"
            dcp_to_torch_save(checkpoint / fsdp.DCP_DIR, merged)
            return torch.load(merged, map_location="cpu", weights_only=True)["model"]
    deepspeed_zero._deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=deepspeed_zero.TAG)


def backbone_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The `backbone.` entries of the method, prefix removed: timm's layout."""
    prefix = "backbone."
    state = {k[len(prefix):]: v for k, v in method_state(checkpoint).items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{checkpoint}: the checkpoint holds no backbone.* weights")
    return state
