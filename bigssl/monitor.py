"""What a run reports: metrics.jsonl, TensorBoard scalars, progress and messages, from rank 0 only.

A write that fails (a full disk) ends the run with one line naming the file (a UserError) and
leaves what was logged before intact: a metrics record that could not be written whole is cut
off again, and TensorBoard's writer thread, whose failure its next call re-raises, prints no
traceback of its own.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bigssl import files
from bigssl.progress import ProgressLine


def _drop_records_after(path: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: drop what the lost run logged there."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the crash
    files.write_text(path, "".join(line + "\n" for line in kept))


def _quiet_tensorboard_thread(args: threading.ExceptHookArgs) -> None:
    """TensorBoard's writer thread re-raises a write error after storing it for the writer's next
    call, which reports it (as one line, below): its traceback would only repeat it."""
    if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
        return
    _other_excepthook(args)


_other_excepthook = threading.excepthook


def _install_quiet_tensorboard_thread() -> None:
    global _other_excepthook
    if threading.excepthook is not _quiet_tensorboard_thread:
        _other_excepthook = threading.excepthook
        threading.excepthook = _quiet_tensorboard_thread


def run_directory_note(run_dir: Path) -> str:
    """Where everything went, and the one command to look at it."""
    entries = sorted(path.name + ("/" if path.is_dir() else "") for path in run_dir.iterdir()
                     if not path.name.startswith("."))
    note = f"bigssl: run directory {run_dir}: {', '.join(entries)}"
    if (run_dir / "tb").is_dir():
        note += f"\nbigssl: to look at it: tensorboard --logdir {run_dir / 'tb'}"
    return note


class Monitor:
    def __init__(self, run_dir: Path, is_main: bool, start_step: int, tensorboard: bool = True,
                 progress: bool = True) -> None:
        self.is_main = is_main
        self.writer = None
        self.show_progress = progress
        self.bar: ProgressLine | None = None
        self.metrics_file = None
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = self.metrics_path = run_dir / "metrics.jsonl"
        if start_step and path.exists():
            _drop_records_after(path, start_step)
        with files.failing_as(path):  # unbuffered: a record is on its way to the disk, or the error is here
            self.metrics_file = path.open("ab", buffering=0)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            _install_quiet_tensorboard_thread()
            self.tb_dir = run_dir / "tb"
            with files.failing_as(self.tb_dir):  # the first event is written and flushed here
                self.writer = SummaryWriter(str(self.tb_dir), purge_step=start_step or None)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl and write each number as a TensorBoard scalar."""
        if not self.is_main:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        self._append(json.dumps(record) + "\n")
        scalars = [(name if "/" in name else f"train/{name}", value) for name, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)]
        self._tensorboard(lambda writer: [writer.add_scalar(name, value, step) for name, value in scalars])

    def _append(self, line: str) -> None:
        """One whole line or, when the write fails, none: the file is cut back to where it was."""
        handle, data = self.metrics_file, line.encode()
        end = os.fstat(handle.fileno()).st_size
        try:
            with files.failing_as(self.metrics_path):
                written = 0
                while written < len(data):  # a full disk may take part of it before it refuses
                    written += handle.write(data[written:])
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(handle.fileno(), end)
            raise

    def _tensorboard(self, write: Callable[[Any], Any]) -> None:
        if self.writer is not None:
            with files.failing_as(self.tb_dir):
                write(self.writer)

    def image(self, tag: str, image, step: int) -> None:
        """A [3, H, W] float image in [0, 1] to TensorBoard."""
        self._tensorboard(lambda writer: writer.add_image(tag, image, step))

    def embedding(self, tag: str, features, labels: list, step: int) -> None:
        """Vectors with their labels for TensorBoard's projector."""
        self._tensorboard(lambda writer: writer.add_embedding(features, metadata=labels, tag=tag, global_step=step))

    def start_progress(self, total_steps: int, start_step: int) -> None:
        """From here on each log window reports its step (timed from now, not from start-up)."""
        if self.is_main and self.show_progress:
            self.bar = ProgressLine(total_steps, start_step)

    def progress(self, step: int, fields: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.update(step, fields)

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def end_progress(self) -> None:
        """End the live line so that what follows (evaluation, summary) prints below it."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self, failing: bool = False) -> None:
        """Flush and close everything. A write error is raised (after closing) unless `failing`:
        an error already on its way is the one to report. TensorBoard's writer thread reports
        its failure only to the flush, never to close: hence the flush first."""
        self.end_progress()
        writer, metrics, self.writer, self.metrics_file = self.writer, self.metrics_file, None, None
        try:
            if writer is not None:
                with files.failing_as(self.tb_dir):
                    writer.flush()
        except Exception:
            if not failing:
                raise
        finally:
            with contextlib.suppress(Exception):
                if writer is not None:
                    writer.close()
            if metrics is not None:
                with contextlib.suppress(OSError):
                    metrics.close()
