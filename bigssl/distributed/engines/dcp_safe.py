"""torch.distributed.checkpoint (DCP) directories read without running code from them.

torch 2.14's FileSystemReader unpickles `.metadata` with plain `pickle.load`, and its
DefaultLoadPlanner reads every non-tensor entry (optimizer hyper-parameters, names) with
`torch.load(weights_only=False)`: a crafted checkpoint runs code at load. Here `.metadata` goes
through an unpickler that resolves only DCP's own metadata classes (plain dataclasses), torch's
Size, dtypes and layouts, and paths; its entries are then checked to point at files inside the
directory; non-tensor entries are read weights-only. Failures are CheckpointErrors naming the
file, never DCP's CheckpointException (a BaseException, which would escape every handler).
"""

from __future__ import annotations

import io
import pathlib
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex, TensorStorageMetadata

from bigssl.distributed.engines.safe_load import naming, refusal
from bigssl.errors import CheckpointError

METADATA = ".metadata"

__all__ = ["CheckpointException", "inspect", "load", "read_model_state"]


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) → object: everything a DCP `.metadata` of a tensor state dict pickles. Each
    is a dataclass, an enum, a value, or a constructor without side effects (Size, paths, torch's
    layout lookup), so resolving them runs no code an attacker could choose."""
    classes: list[Any] = [dcp_metadata.Metadata, dcp_metadata.TensorStorageMetadata, dcp_metadata.BytesStorageMetadata,
                          dcp_metadata.ChunkStorageMetadata, dcp_metadata.TensorProperties, dcp_metadata.MetadataIndex,
                          dcp_metadata.StorageMeta, dcp_metadata._MEM_FORMAT_ENCODING, _StorageInfo, torch.Size,
                          torch.serialization._get_layout]
    allowed = {(c.__module__, c.__qualname__): c for c in classes}
    for path_class in (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath):
        allowed[(path_class.__module__, path_class.__name__)] = path_class
        allowed[("pathlib", path_class.__name__)] = path_class  # how Python < 3.13 names them
    for name, value in vars(torch).items():  # dtypes pickle as globals: torch.float32
        if isinstance(value, torch.dtype | torch.layout):
            allowed[("torch", name)] = value
    return allowed


class _Refused(Exception):
    """A global outside the allow-list: resolving it could run anything."""


class _MetadataUnpickler(pickle.Unpickler):
    allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


def read_metadata(dcp_dir: Path) -> Metadata:
    """`dcp_dir/.metadata`, unpickled with the allow-list and checked; CheckpointError otherwise."""
    path = dcp_dir / METADATA
    with naming(path):
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except _Refused as refused:
            raise CheckpointError(f"{path}: refused: it holds more than DCP metadata (a pickled {refused})") from None
    problem = _metadata_problem(dcp_dir, metadata)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    return metadata


def _metadata_problem(dcp_dir: Path, metadata: Any) -> str | None:
    """What makes `metadata` unfit to load from `dcp_dir`: the wrong types, an entry pointing
    outside the directory or past the end of its file, or a stream transform (bigssl writes none)."""
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        return f"not DCP metadata ({type(metadata).__name__})"
    if not all(isinstance(v, TensorStorageMetadata | BytesStorageMetadata)
               for v in metadata.state_dict_metadata.values()):
        return "an entry is neither a tensor nor bytes"
    if not isinstance(metadata.storage_data, dict):
        return "no storage table"
    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        if not isinstance(index, MetadataIndex) or not isinstance(index.fqn, str):
            return "a storage key is not an entry name"
        if not isinstance(info, _StorageInfo) or not isinstance(info.relative_path, str):
            return "a storage entry is not a file range"
        name = info.relative_path
        if Path(name).name != name or name in ("", ".", "..", METADATA):
            return f"a storage entry points outside the directory ({name!r})"
        if info.transform_descriptors:
            return f"{name}: stream transforms {list(info.transform_descriptors)} (bigssl writes none)"
        if name not in sizes:
            file = dcp_dir / name
            if not file.is_file():
                return f"{name}: missing"
            sizes[name] = file.stat().st_size
        if not (isinstance(info.offset, int) and isinstance(info.length, int)
                and min(info.offset, info.length) >= 0 and info.offset + info.length <= sizes[name]):
            return f"{name}: an entry lies outside the file ({info.offset}+{info.length} of {sizes[name]} bytes)"
    return None


class SafeReader(FileSystemReader):
    """A FileSystemReader whose metadata is the checked one, parsed once (no rank-local fallback:
    bigssl always writes the global .metadata), and whose read failures name the data file."""

    def __init__(self, dcp_dir: Path) -> None:
        super().__init__(dcp_dir)
        self.metadata = read_metadata(Path(dcp_dir))
        self.reading: str | Path = dcp_dir  # the data file being read, for error messages

    def _slice_file(self, file, sinfo: _StorageInfo):
        self.reading = getattr(file, "name", self.reading)  # called per entry with the open data file
        return super()._slice_file(file, sinfo)

    def read_data(self, plan, planner):
        try:
            return super().read_data(plan, planner)
        except CheckpointError as err:  # SafePlanner's: it knows the entry, not the file
            raise CheckpointError(f"{self.reading}: {err}") from err
        except Exception as exc:
            raise CheckpointError(f"{self.reading}: {refusal(exc)}") from exc

    def read_metadata(self) -> Metadata:  # type: ignore[override]  # no rank= form: see the class
        metadata = self.metadata
        if metadata.storage_meta is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as FileSystemReader does: this load's id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner with non-tensor entries read weights-only (plain values are all DCP
    stores for a model and its optimizer: names, hyper-parameters, step counts)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"entry {fqn}: {refusal(exc)}") from exc
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def _described(dcp_dir: Path, failure: CheckpointException) -> CheckpointError:
    """DCP's per-rank failures as one line: the first CheckpointError's text when one of ours."""
    errors = [wrapped[0] for wrapped in failure.failures.values()]
    ours = next((e for e in errors if isinstance(e, CheckpointError)), None)
    if ours is not None:
        text = str(ours)
        return CheckpointError(text if text.startswith(str(dcp_dir)) else f"{dcp_dir}: {text}")
    first = errors[0] if errors else failure
    return CheckpointError(f"{dcp_dir}: {refusal(first)}")


def load(state: dict[str, Any], dcp_dir: Path, alone: bool = False) -> None:
    """dcp.load into `state` (a collective over the process group, unless `alone`)."""
    reader = SafeReader(dcp_dir)  # checked before any rank starts DCP's collective protocol
    try:
        with warnings.catch_warnings():
            # alone: DCP warns that it assumes one process, which is what is meant.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, planner=SafePlanner(), no_dist=alone)
    except CheckpointException as failure:
        raise _described(dcp_dir, failure) from None
    except CheckpointError as err:  # raised outside DCP's wrapper (one process)
        raise CheckpointError(f"{dcp_dir}: {err}") from err


def read_model_state(dcp_dir: Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The entries under `prefix` (prefix removed), whole, in one process with no process group:
    empty tensors shaped from the checked metadata, then filled by DCP from every rank's shard."""
    metadata = read_metadata(dcp_dir)
    state: dict[str, Any] = {}
    for fqn, entry in metadata.state_dict_metadata.items():
        if fqn.startswith(prefix) and isinstance(entry, TensorStorageMetadata):
            state[fqn] = torch.empty(entry.size, dtype=entry.properties.dtype)
    load(state, dcp_dir, alone=True)
    return {fqn.removeprefix(prefix): tensor for fqn, tensor in state.items()}


def inspect(dcp_dir: Path) -> None:
    """Check `.metadata` and read every non-tensor entry weights-only (they are small: tensors
    are left on disk); raises CheckpointError naming the file."""
    metadata = read_metadata(dcp_dir)
    byte_entries = {fqn for fqn, e in metadata.state_dict_metadata.items() if isinstance(e, BytesStorageMetadata)}
    stored = {index.fqn: info for index, info in metadata.storage_data.items() if index.fqn in byte_entries}
    if missing := sorted(byte_entries - stored.keys()):
        raise CheckpointError(f"{dcp_dir / METADATA}: entry {missing[0]} has no storage")
    for fqn, info in stored.items():
        path = dcp_dir / info.relative_path
        with naming(path), open(path, "rb") as handle:
            handle.seek(info.offset)
            try:
                torch.load(io.BytesIO(handle.read(info.length)), weights_only=True)
            except Exception as exc:
                raise CheckpointError(f"{path}: entry {fqn}: {refusal(exc)}") from exc
