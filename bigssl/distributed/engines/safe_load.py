"""Reading checkpoint files without running code from them.

A checkpoint's manifest (bigssl/checkpoint.py) catches damage, not malice: whoever can plant a
file in the directory can rewrite manifest.json beside it. So every file is also read by a
parser that cannot run code: torch's weights-only unpickler for `.pt` files (tensors, containers
and plain values, plus the handful of DeepSpeed classes its files hold, allowed by name), and a
restricted unpickler for DCP's `.metadata` (bigssl/distributed/engines/dcp_safe.py).

`file_check.inspect(checkpoint, name)` parses one file of a checkpoint with these readers, the
way its engine will, without reading tensor data (`.pt` files are memory-mapped), so that
resume, export and eval refuse a file before anything acts on it; every failure is a
CheckpointError naming the file.
"""

from __future__ import annotations

import contextlib
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bigssl.errors import CheckpointError

DEEPSPEED_DIR = "zero"  # deepspeed_zero.TAG (not imported: that module imports DeepSpeed's helpers)


class _Record:
    """Stands in for a DeepSpeed object (a loss scaler, a fragment address) when a ZeRO file is
    read without DeepSpeed: its attributes are kept as data, no DeepSpeed code runs."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def _enum_value(value: Any) -> Any:
    """Stands in for a DeepSpeed enum (ZeroStageEnum): its plain value."""
    return value


# What DeepSpeed 0.17-0.19 pickles besides tensors, by qualified name. Mapped to stand-ins, so a
# ZeRO file is checked and merged without importing DeepSpeed (seconds, and a line on stderr).
DEEPSPEED_STAND_INS: list[tuple[Any, str]] = [
    (_Record, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_Record, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (_Record, "deepspeed.utils.tensor_fragment.fragment_address"),
    (_enum_value, "deepspeed.runtime.zero.config.ZeroStageEnum"),
]


def refusal(exc: BaseException) -> str:
    """Why a file was not loaded, in one line: the weights-only unpickler's own verdict (which
    global it refused) rather than its advice to load with weights_only=False."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", text, re.DOTALL)
    if found:
        verdict = " ".join(found.group(1).split()).split(". Please use")[0].rstrip(".")
        if verdict.startswith("Unsupported operand"):  # not a pickle at all: damage, not an attack
            return f"unreadable (not a torch file: {verdict})"
        name = re.match(r"Unsupported global: GLOBAL (\S+)", verdict)
        what = f"a pickled {name.group(1)}" if name else verdict
        return f"refused: it holds more than tensors and plain values ({what})"
    first = (text.strip().splitlines() or [""])[0]
    first = first.split(". This is an internal miniz error")[0]  # torch's hint says what follows: corrupt
    return f"unreadable ({type(exc).__name__}: {first})" if first else f"unreadable ({type(exc).__name__})"


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Any failure to read `path` becomes a CheckpointError that names it."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: {refusal(exc)}") from exc


def load_tensors(path: Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """torch.load, weights only, naming `path` on failure; `mmap` leaves tensor data on disk."""
    with naming(path):
        _whole_archive(path, mmap)
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def load_deepspeed_file(path: Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """A ZeRO file read weights-only, with DeepSpeed's few classes replaced by inert stand-ins."""
    with naming(path), torch.serialization.safe_globals(DEEPSPEED_STAND_INS):
        _whole_archive(path, mmap)
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def _whole_archive(path: Path, mmap: bool) -> None:
    """torch.save writes a zip archive; one cut short fails a memory-mapped load with a bare
    EINVAL, so say what it is first (an unmapped load names it itself)."""
    if mmap and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: unreadable (not a whole torch archive: truncated, or not written by torch)")
