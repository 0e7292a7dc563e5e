"""Checkpoint directories: atomic publication, checksums, retention, and finding the one to resume from.

A checkpoint is a directory `checkpoints/step_XXXXXXXX/` whose content the engine writes (one
file for DDP, one shard per rank for sharded engines). It is written as
`step_XXXXXXXX.partial/` and renamed only when every rank has finished and `manifest.json`
(size and sha256 of every file) is on disk, so a crash mid-write never leaves something that
looks complete, and older checkpoints are deleted only after the new one is published.

Faults are decided together: every step that can fail on one rank (a full disk, a bad shard, a
non-finite weight) is followed by a collective that tells every rank, so all ranks raise the
same error instead of some of them waiting forever in the next collective.

Nothing is loaded unverified: a checkpoint is used only when it has a manifest, its files are
exactly the manifest's with the sizes and hashes it lists, and every file parses as its engine
reads it without running code (bigssl/distributed/engines/safe_load.py: the checksums catch
damage, the parsers malice, since whoever can plant a file can rewrite the manifest too). At
resume, a checkpoint that fails any of this, or whose load then fails, is renamed
`step_XXXXXXXX.corrupt` (never deleted: it is the user's data) and the next older one is
tried; export and eval refuse it (bigssl/eval/export.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from bigssl import files
from bigssl.distributed import comm
from bigssl.distributed.engines import file_check
from bigssl.distributed.engines.base import Engine
from bigssl.distributed.engines.dcp_safe import CheckpointException
from bigssl.errors import CheckpointError, UserError

PATTERN = re.compile(r"^step_(\d{8})$")
CORRUPT = re.compile(r"^step_\d{8}\.corrupt(-\d+)?$")  # set aside: neither resumed nor counted by retention
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1

T = TypeVar("T")


class _Failed(Exception):
    """A step failed on some rank; raised identically on every rank once they have agreed."""

    def __init__(self, description: str, local: BaseException | None) -> None:
        super().__init__(description)
        self.description = description
        self.local = local  # this rank's own exception, if it is one that failed


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int, is_main: bool) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = max(1, keep)
        self.is_main = is_main  # rank 0: the rank that creates, renames and deletes directories

    def published(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and PATTERN.match(p.name)]
        return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))

    def latest(self) -> Path | None:
        """The newest published checkpoint, unverified (this process alone; no collective)."""
        found = self.published()
        return found[-1] if found else None

    def kept_note(self) -> str:
        """What a run that stops on an error leaves to resume from, in words."""
        latest = self.latest()
        if latest is None:
            return "No checkpoint was written yet (a rerun starts from step 0)"
        return f"The last checkpoint, {latest}, is kept"

    def set_aside(self) -> list[Path]:
        """Checkpoints renamed `.corrupt` by an earlier resume."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and CORRUPT.match(p.name))

    # ------------------------------------------------------------------------------ save
    def save(self, step: int, engine: Engine, extra: dict[str, Any]) -> Path:
        """Write, checksum and publish checkpoint `step` (a collective: every rank calls it).

        Raises UserError on every rank, with nothing published and the previous checkpoint
        untouched, when a weight is not finite or when writing fails on any rank."""
        final = self.root / f"step_{step:08d}"
        partial = final.with_name(final.name + ".partial")
        previous = self.latest()
        kept = f"the last good checkpoint {previous.name} is kept" if previous else "there is no earlier checkpoint"
        self._check_finite(engine, final, kept)
        failure: _Failed | None = None
        try:
            self._together(lambda: self._fresh_directory(partial))
            self._together(lambda: engine.save(partial, extra))
            self._write_manifest(partial)
            self._together(lambda: self._publish(partial, final))
        except _Failed as failed:
            failure = failed
        if failure is not None:  # every rank is here: the failure was agreed
            if self.is_main:
                shutil.rmtree(partial, ignore_errors=True)  # best effort: the disk may be what failed
            comm.barrier()
            local = failure.local
            if local is not None and not _is_write_error(local):
                raise local  # a bug, not a fault of the disk: keep its traceback (the other ranks say why they stop)
            raise UserError(f"could not write checkpoint {final} ({failure.description}); {kept}") from local
        if self.is_main:  # retention only once the new checkpoint is published
            for old in self.published()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        comm.barrier()
        return final

    def _fresh_directory(self, partial: Path) -> None:
        if self.is_main:
            shutil.rmtree(partial, ignore_errors=True)  # left by a crash mid-write
            partial.mkdir(parents=True)

    def _publish(self, partial: Path, final: Path) -> None:
        if self.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            _fsync_directory(self.root)  # the rename itself survives a power cut

    def _write_manifest(self, directory: Path) -> None:
        """Size and sha256 of every file, hashed in parallel (rank r takes files[r::world]); each
        file is also fsynced, so what the manifest vouches for is on disk before publication."""
        listing = self._together(lambda: _files(directory) if self.is_main else [])
        names: list[str] = comm.all_gather_object(listing)[0]
        mine = self._together(lambda: [_entry(directory, name) for name in names[comm.rank()::comm.world_size()]])
        entries = sorted((e for part in comm.all_gather_object(mine) for e in part), key=lambda e: e["path"])

        def write() -> None:
            if not self.is_main:
                return
            text = json.dumps({"format": MANIFEST_FORMAT, "files": entries}, indent=1) + "\n"
            with open(directory / MANIFEST, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            for sub in sorted({(directory / name).parent for name in names} | {directory}, reverse=True):
                _fsync_directory(sub)  # deepest first: every new entry is durable before the rename

        self._together(write)

    def _check_finite(self, engine: Engine, final: Path, kept: str) -> None:
        """Never write a checkpoint with a NaN or Inf weight, or a NaN buffer: resuming from it
        would lose the run. (Buffers may hold ±inf on purpose: an attention mask.) Each rank checks
        its local shards; one flag per tensor, read back with one sync per device."""
        named = [(f"parameter {n}", p, torch.isfinite) for n, p in engine.method.named_parameters()]
        named += [(f"buffer {n}", b, _not_nan) for n, b in engine.method.named_buffers() if b.is_floating_point()]
        tensors = [(name, engine.local_tensor(t), test) for name, t, test in named]
        tensors = [(name, t, test) for name, t, test in tensors if t.is_floating_point() or t.is_complex()]
        by_device: dict[torch.device, list[int]] = {}
        for index, (_, tensor, _) in enumerate(tensors):
            by_device.setdefault(tensor.device, []).append(index)
        non_finite: list[int] = []
        for indices in by_device.values():
            flags = torch.stack([tensors[i][2](tensors[i][1]).all() for i in indices]).tolist()
            non_finite += [i for i, ok in zip(indices, flags, strict=True) if not ok]
        first = tensors[min(non_finite)][0] if non_finite else None
        if comm.all_agree(first is None):
            return
        rank, name = next((r, n) for r, n in enumerate(comm.all_gather_object(first)) if n is not None)
        where = f" on rank {rank}" if comm.world_size() > 1 else ""
        raise UserError(f"not writing checkpoint {final}: {name} is not finite (NaN or Inf){where}; {kept}")

    def _together(self, work: Callable[[], T]) -> T:
        """`work()` on this rank, then agreement: if it failed on any rank, every rank raises
        _Failed with the first failing rank's error, so none is left waiting in a collective."""
        error: BaseException | None = None
        result: Any = None
        try:
            result = work()
        except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
            error = exc
        if comm.all_agree(error is None):
            return result
        described = comm.all_gather_object(None if error is None else _describe(error, self.root))
        rank, text = next((r, d) for r, d in enumerate(described) if d is not None)
        raise _Failed(f"rank {rank}: {text}" if comm.world_size() > 1 else text, error)

    # ---------------------------------------------------------------------------- resume
    def verify(self, checkpoint: Path) -> str | None:
        """What is wrong with `checkpoint` ('file: reason'), or None when its files are exactly
        its manifest's and each parses safely. A collective: the files are checked in parallel
        over ranks and every rank returns the same answer."""
        read = self._from_main(lambda: _read_manifest(checkpoint))
        if isinstance(read, str):
            return read
        rank, world = comm.rank(), comm.world_size()
        try:
            mine = _first_problem(checkpoint, read[rank::world])
        except Exception as exc:  # whatever happens here, this rank must reach the gather below
            mine = (0, f"unreadable ({exc})")
        if mine is not None:
            mine = (mine[0] * world + rank, mine[1])  # index into the whole list
        found = [p for p in comm.all_gather_object(mine) if p is not None]
        if not found:
            return None
        index, reason = min(found)
        return f"{read[index]['path']}: {reason}"

    def resumable(self, warn: Callable[[str], None]) -> Path | None:
        """The newest published checkpoint that verifies (see `resume`), not loaded."""
        found = self.resume(warn, load=None)
        return None if found is None else found[0]

    def resume(self, warn: Callable[[str], None], load: Callable[[Path], T] | None) -> tuple[Path, T | None] | None:
        """The newest published checkpoint that verifies and, with `load`, loads (its result
        returned with it), or None for a run with no checkpoint (a collective: every rank gets
        the same answer). Each one met on the way that fails is renamed `.corrupt` and reported
        through `warn` (called on every rank with the same line): a checksum or parse failure,
        no manifest, or a CheckpointError from `load` on any rank. Other errors of `load` (a
        checkpoint that does not fit the config, a bug) stop the run with a UserError naming
        the checkpoint, which stays in place: it is not to blame. Raises UserError when
        checkpoints exist but none is intact: starting afresh would overwrite the run."""
        names: list[str] = self._from_main(lambda: [p.name for p in self.published()])
        rejected = []
        for i in reversed(range(len(names))):
            path = self.root / names[i]
            problem = self.verify(path)
            loaded = None
            if problem is None and load is not None:
                loaded, problem = self._load_together(load, path)
            if problem is None:
                return path, loaded
            moved = self._from_main(lambda path=path: _rename_corrupt(path))
            fallback = f"falling back to {names[i - 1]}" if i else "no older checkpoint to fall back to"
            warn(f"bigssl: warning: checkpoint {path} is corrupt ({problem}); {moved}; {fallback}")
            rejected.append(f"{names[i]} ({problem})")
        if rejected:
            raise UserError(f"every checkpoint in {self.root} is corrupt: {', '.join(rejected)}; they were renamed "
                            "*.corrupt; to start afresh, move them away or use another log.dir")
        aside: list[str] = self._from_main(lambda: [p.name for p in self.set_aside()])
        if aside:
            raise UserError(f"{self.root} holds only corrupt checkpoints ({', '.join(aside)}); to start afresh, "
                            "move them away or use another log.dir")
        return None

    def _load_together(self, load: Callable[[Path], T], path: Path) -> tuple[T | None, str | None]:
        """(`load(path)`, None) when it succeeded on every rank; (None, 'file: reason') on every
        rank when it raised a CheckpointError on some rank. Any other failure (most often a
        checkpoint of another model than the config builds) is a UserError naming the checkpoint
        on every rank, chained to the original where it happened (BIGSSL_DEBUG=1 shows both)."""
        value, error = None, None
        try:
            value = load(path)
        except (Exception, CheckpointException) as exc:  # every rank must reach the gather below
            error = exc
        mine = None if error is None else (isinstance(error, CheckpointError), _one_line(error, path))
        reports = [(r, report) for r, report in enumerate(comm.all_gather_object(mine)) if report is not None]
        if not reports:
            return value, None
        rank, (corrupt, text) = reports[0]
        where = f"rank {rank}: " if comm.world_size() > 1 else ""
        if corrupt:
            return None, where + text
        raise UserError(f"could not load checkpoint {path} ({where}{text})") from error

    def _from_main(self, work: Callable[[], T]) -> T:
        """Rank 0's `work()` on every rank (one gather), so all ranks walk the same listing."""
        try:
            value, error = (work(), None) if self.is_main else (None, None)
        except Exception as exc:  # every rank must reach the gather, and learn of rank 0's failure
            value, error = None, f"{type(exc).__name__}: {exc}"
        value, error = comm.all_gather_object((value, error))[0]
        if error is not None:
            raise UserError(f"{self.root}: {error}")
        return value


# ------------------------------------------------------------------------------ file helpers
def _files(directory: Path) -> list[str]:
    """Every file under `directory`, as sorted relative POSIX paths (the manifest aside)."""
    found = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return sorted(name for name in found if name != MANIFEST)


def _hash_file(path: Path, sync: bool = False) -> tuple[int, str]:
    """(size, sha256) of `path`, streamed in chunks (checkpoints can be GBs); `sync` also
    fsyncs it, which surfaces a write error the page cache was still hiding."""
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
        if sync:
            os.fsync(handle.fileno())
        return os.fstat(handle.fileno()).st_size, digest


def _entry(directory: Path, name: str) -> dict[str, Any]:
    size, digest = _hash_file(directory / name, sync=True)
    return {"path": name, "size": size, "sha256": digest}


def _read_manifest(checkpoint: Path) -> list[dict[str, Any]] | str:
    """The manifest's entries, or a 'file: reason' string when it is missing, unreadable,
    malformed, or does not list exactly the files that are there."""
    path = checkpoint / MANIFEST
    if not path.exists():
        return f"{MANIFEST}: missing, so nothing vouches for the files (bigssl loads no unverified checkpoint)"
    try:
        files = json.loads(path.read_text())["files"]
        entries = [{"path": str(e["path"]), "size": int(e["size"]), "sha256": str(e["sha256"])} for e in files]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST}: unreadable ({type(exc).__name__}: {exc})"
    for entry in entries:
        if Path(entry["path"]).is_absolute() or ".." in Path(entry["path"]).parts:
            return f"{MANIFEST}: entry {entry['path']!r} points outside the checkpoint"
    listed = {e["path"] for e in entries}
    if unlisted := [name for name in _files(checkpoint) if name not in listed]:
        return f"{unlisted[0]}: not in the manifest"
    return entries


def _first_problem(checkpoint: Path, entries: list[dict[str, Any]]) -> tuple[int, str] | None:
    """(index, reason) of the first bad entry: sizes first (cheap: a truncated file is found
    without reading anything), then hashes, then whether each parses without running code."""
    for index, entry in enumerate(entries):
        path = checkpoint / entry["path"]
        if not path.is_file():
            return index, "missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return index, f"size mismatch ({size} bytes, manifest says {entry['size']})"
    for index, entry in enumerate(entries):
        try:
            _, digest = _hash_file(checkpoint / entry["path"])
        except OSError as exc:
            return index, f"unreadable ({exc.strerror or exc})"
        if digest != entry["sha256"]:
            return index, "sha256 mismatch"
    for index, entry in enumerate(entries):
        try:
            file_check.inspect(checkpoint, entry["path"])
        except CheckpointError as err:
            # 'PATH: reason' → 'reason' for this entry, else 'other/file: reason' (a DCP entry's data file)
            text = str(err).removeprefix(f"{checkpoint / entry['path']}: ")
            return index, text.replace(f"{checkpoint}{os.sep}", "")
    return None


def verify_alone(checkpoint: Path) -> str | None:
    """`Checkpointer.verify` in this process alone (no collective): for export and eval."""
    read = _read_manifest(checkpoint)
    if isinstance(read, str):
        return read
    found = _first_problem(checkpoint, read)
    return None if found is None else f"{read[found[0]]['path']}: {found[1]}"


def _rename_corrupt(path: Path) -> str:
    """Rename `path` to a `.corrupt` name that no pattern resumes; says what happened."""
    target = path.with_name(path.name + ".corrupt")
    n = 2
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{n}")
        n += 1
    try:
        os.replace(path, target)
    except OSError as exc:
        return f"could not rename it ({exc})"
    return f"renamed to {target.name}"


def _fsync_directory(directory: Path) -> None:
    """Make the directory's entries durable; best effort (some file systems refuse)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- error helpers
def _causes(exc: BaseException) -> list[BaseException]:
    """`exc`, its causes and contexts, and the per-rank failures DCP wraps, breadth first."""
    seen: list[BaseException] = []
    queue = [exc]
    while queue:
        current = queue.pop(0)
        if any(current is s for s in seen):
            continue
        seen.append(current)
        queue += [e for e in (current.__cause__, current.__context__) if e is not None]
        if isinstance(current, CheckpointException):
            queue += [wrapped[0] for wrapped in current.failures.values()]
    return seen


# torch.save to a path writes from C++ and reports a full disk without an errno, e.g.
# "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534".
_TORCH_WRITER_MARKS = ("inline_container", "PytorchStreamWriter", "file write failed")


def _is_write_error(exc: BaseException) -> bool:
    """An OSError somewhere in the chain, or torch's C++ writer failing (anything else is a bug
    and keeps its traceback)."""
    return any(isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITER_MARKS))
               for e in _causes(exc))


def _describe(exc: BaseException, where: Path) -> str:
    """One line: the OS error when there is one, with the free space when the disk may be full."""
    os_error = next((e for e in _causes(exc) if isinstance(e, OSError)), None)
    if os_error is not None:
        text = str(os_error)
        full = os_error.errno in (errno.ENOSPC, errno.EDQUOT)
    else:  # no errno to go by (torch's C++ writer): the free space tells whether the disk is full
        cause = next((e for e in _causes(exc) if not isinstance(e, CheckpointException)), exc)
        text, full = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}", True
    return text + (files.free_space(where) if full else "")


def _one_line(exc: BaseException, checkpoint: Path) -> str:
    """A load failure as 'file: reason' (relative to the checkpoint) or 'Type: first line'."""
    if isinstance(exc, CheckpointError):
        return str(exc).replace(f"{checkpoint}{os.sep}", "")
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def _not_nan(tensor: torch.Tensor) -> torch.Tensor:
    return ~torch.isnan(tensor)
