"""Backbone weights as one safetensors file (timm's state-dict layout, no head)."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file
from torch import nn


def save_backbone(backbone: nn.Module, path: Path) -> None:
    tensors = {name: t.detach().cpu().contiguous() for name, t in backbone.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "bigssl"})
    os.replace(tmp, path)
