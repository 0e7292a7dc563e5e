"""The whole state dict of the method from any engine's checkpoint directory, in one process
and without a process group: what `bigssl export` writes out and `bigssl eval` scores.

Each registered engine recognises its own checkpoints (`Engine.holds`) and reads them whole
(`Engine.whole_method_state`), every file read without running code from it; this module only
asks them in turn.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bigssl.distributed.engines import ENGINES
from bigssl.distributed.engines.base import Engine


def engine_of(checkpoint: Path) -> type[Engine]:
    """The engine class that wrote `checkpoint`."""
    for engine in ENGINES.values():
        if engine.holds(checkpoint):
            return engine
    markers = [engine.checkpoint_marker for engine in ENGINES.values()]
    raise FileNotFoundError(f"{checkpoint}: not a bigssl checkpoint (no {', '.join(markers[:-1])} or {markers[-1]})")


def method_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    return engine_of(checkpoint).whole_method_state(checkpoint)


def backbone_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The `backbone.` entries of the method, prefix removed: timm's layout."""
    prefix = "backbone."
    state = {k[len(prefix):]: v for k, v in method_state(checkpoint).items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{checkpoint}: the checkpoint holds no backbone.* weights")
    return state
