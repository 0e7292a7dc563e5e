"""One checkpoint file parsed the way its engine will read it, before anything acts on it.

Above both safe readers (safe_load.py for `.pt` files, dcp_safe.py for DCP's `.metadata`, which
builds on safe_load's helpers), so neither needs the other.
"""

from __future__ import annotations

from pathlib import Path

from bigssl.distributed.engines import dcp_safe
from bigssl.distributed.engines.safe_load import DEEPSPEED_DIR, load_deepspeed_file, load_tensors


def inspect(checkpoint: Path, name: str) -> None:
    """Parse `checkpoint/name` as its engine will (tensor data left on disk); raises
    CheckpointError naming the file when it is unreadable or holds more than it may."""
    path = checkpoint / name
    parts = Path(name).parts
    if name.endswith(".pt") and parts[0] == DEEPSPEED_DIR:
        load_deepspeed_file(path, mmap=True)
    elif name.endswith(".pt"):
        load_tensors(path, mmap=True)
    elif parts[-1] == ".metadata":
        dcp_safe.inspect(path.parent)
    # Anything else is never parsed by bigssl: DCP's data files are read through the checked
    # .metadata, DeepSpeed's `latest` names a tag bigssl does not use, its scripts are not run.
