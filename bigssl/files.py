"""Writing the run's own files (config.yaml, the exported backbone, metrics) so that a full disk
or another write error ends the run with one line naming the file, and never leaves a partly
written file where a good one was: each file is written under a temporary name in the same
directory (same file system, so the rename is atomic) and renamed over the old one only when
complete. Checkpoints have their own, collective, version of this (bigssl/checkpoint.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from bigssl.errors import UserError

TMP_SUFFIX = ".tmp"
_FULL = (errno.ENOSPC, errno.EDQUOT)


def free_space(where: Path) -> str:
    """'; N MiB free there', or '' when the file system cannot be asked."""
    for place in (where, *where.parents):
        with contextlib.suppress(OSError):
            return f"; {shutil.disk_usage(place).free / 2**20:.1f} MiB free there"
    return ""


def is_write_error(exc: BaseException) -> bool:
    """An OS error, or safetensors' writer failing on one (it raises its own type and names the
    OS error only in its text, e.g. 'I/O error: No space left on device (os error 28)')."""
    return isinstance(exc, OSError) or (type(exc).__name__ == "SafetensorError" and "os error" in str(exc))


def write_failure(path: Path, exc: BaseException) -> UserError:
    """The one line for a failed write of `path` (a file, or the directory a writer fills), with
    the free space where the write failed when the disk is full."""
    if isinstance(exc, OSError):
        code, reason = exc.errno, exc.strerror or str(exc)
    else:  # safetensors: the errno is in the text only
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
        reason = os.strerror(code) if code else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    where = Path(exc.filename).parent if getattr(exc, "filename", None) else path if path.is_dir() else path.parent
    return UserError(f"could not write {path} ({reason}{free_space(where) if code in _FULL else ''})")


@contextlib.contextmanager
def failing_as(path: Path) -> Iterator[None]:
    """A write error inside becomes the one-line UserError naming `path` (what the user knows:
    the file, not its temporary name). Other errors (bugs) propagate unchanged."""
    try:
        yield
    except Exception as exc:
        if is_write_error(exc):
            raise write_failure(path, exc) from exc
        raise


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename tmp over `path`; on a write error, tmp is removed, `path` is as
    it was, and a one-line UserError names `path`."""
    tmp = temporary(path)
    try:
        with failing_as(path):
            write(tmp)
            sync(tmp)
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text))


def temporary(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: beside it, so on its file system."""
    return path.with_name(path.name + TMP_SUFFIX)


def sync(path: Path) -> None:
    """Flush `path` to disk before it is renamed into place: a full disk that the page cache hid
    surfaces here, and a power cut cannot publish a file whose blocks were never written."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
