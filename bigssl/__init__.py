"""bigssl: distributed self-supervised visual pretraining."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__version__ = "0.1.0"


def load_backbone(folder: str | Path) -> nn.Module:
    """The backbone exported to `folder` (a run's `backbone/`, or `bigssl export RUN DIR/`) as a
    plain timm model with the features the run evaluated. Works for every export; timm alone
    (`timm.create_model("local-dir:DIR", pretrained=True, num_classes=0)`) loads those whose
    config.json says `"loader": "timm"`, i.e. all but small-stem ResNets."""
    from bigssl.eval.hub import load_backbone as load  # torch and timm only when asked for

    return load(folder)
