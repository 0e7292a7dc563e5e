"""What a run reports: metrics.jsonl, TensorBoard scalars, progress and messages, from rank 0 only."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


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
        path = run_dir / "metrics.jsonl"
        if start_step and path.exists():
            _drop_records_after(path, start_step)
        self.metrics_file = path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step or None)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl and write each number as a TensorBoard scalar."""
        if not self.is_main:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.writer.add_scalar(name if "/" in name else f"train/{name}", value, step)

    def image(self, tag: str, image, step: int) -> None:
        """A [3, H, W] float image in [0, 1] to TensorBoard."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step)

    def embedding(self, tag: str, features, labels: list, step: int) -> None:
        """Vectors with their labels for TensorBoard's projector."""
        if self.writer is not None:
            self.writer.add_embedding(features, metadata=labels, tag=tag, global_step=step)

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

    def close(self) -> None:
        self.end_progress()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
