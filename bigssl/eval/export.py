"""The trained backbone, written out: a folder in timm's hub layout (bigssl/eval/hub.py) at the
end of every run and from `bigssl export RUN OUT_DIR/`, or one safetensors file (timm's
state-dict names, no head) from `bigssl export RUN OUT.safetensors`."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from bigssl import files
from bigssl.config import Config
from bigssl.errors import UserError
from bigssl.eval import hub
from bigssl.eval.runs import checkpoint_dir, locate

RUN_FOLDER = "backbone"  # in the run directory; CMC, whose trunk timm has no model for: backbone.safetensors


def save_backbone(backbone: nn.Module, config: Config, run_dir: Path) -> Path:
    """The end of a run: `run_dir/backbone/` in timm's hub layout, or `run_dir/backbone.safetensors`
    for a trunk that is not one timm model. Returns what was written."""
    state = backbone.state_dict()
    try:
        hub.write_folder(state, config.model, config.data.views, run_dir / RUN_FOLDER)
        return run_dir / RUN_FOLDER
    except hub.NotOneTimmModel:
        save_tensors(state, run_dir / "backbone.safetensors")
        return run_dir / "backbone.safetensors"


def save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """One safetensors file, renamed into place when complete (a failed write names `path`)."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in state.items()}
    files.write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt",
                                                                                   "producer": "bigssl"}))


def export_backbone(run_or_checkpoint: Path, out: Path) -> tuple[Path, int, str | None]:
    """Write the backbone of any engine's checkpoint to `out`: one safetensors file when `out`
    ends in .safetensors, else a folder in timm's hub layout (which needs the run's config.yaml).
    Returns the checkpoint used, the number of tensors and, for a folder, the line that loads it."""
    from bigssl.distributed.engines.consolidate import backbone_state

    single_file = out.suffix == ".safetensors"
    saved = None if single_file else locate(run_or_checkpoint)  # which verifies the checkpoint
    checkpoint = saved.checkpoint if saved else checkpoint_dir(run_or_checkpoint)
    try:
        state = backbone_state(checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from err
    if saved is None:
        save_tensors(state, out)
        return checkpoint, len(state), None
    try:
        line = hub.write_folder(state, saved.config.model, saved.config.data.views, out)
    except hub.NotOneTimmModel as err:
        raise UserError(f"{run_or_checkpoint}: method {saved.config.method.name}: {err}; timm has no model for "
                        f"this trunk, export it as one file: bigssl export {run_or_checkpoint} OUT.safetensors"
                        ) from None
    return checkpoint, len(state), line
