"""Training progress for people: one live line on a terminal, one plain line per log window elsewhere.

The rate behind the ETA is the steady one: the first log window after a (re)start carries the
data workers' start-up, the first batches' allocations and any compilation, so it is left out
once a later window exists. Before that no ETA is shown rather than a wrong one. Phases that
are not steps (writing shards, baselines, the final evaluation) are announced by the trainer as
messages, with their own durations.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

WINDOWS_FOR_RATE = 20  # recent log windows the rate is averaged over (follows slow-downs, smooths noise)


def clock(seconds: float) -> str:
    """0:07, 1:52, 1:02:03."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressLine:
    """Reports `step/total` with elapsed time, ETA, images/s and the latest values.

    On a terminal the line is rewritten in place and messages print above it; on anything else
    (a SLURM log, a pipe) each update is one line, so logs hold no carriage returns.
    """

    def __init__(self, total_steps: int, start_step: int, stream: TextIO | None = None, tty: bool | None = None,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.total, self.start_step = total_steps, start_step
        self.now = now
        self.started = now()
        self.marks: deque[tuple[float, int]] = deque(maxlen=WINDOWS_FOR_RATE + 1)  # (time, step) per update
        self.line = ""

    def steps_per_s(self) -> float | None:
        """Over the recent windows after the first one; None until one such window exists."""
        if len(self.marks) < 2:
            return None
        (t0, s0), (t1, s1) = self.marks[0], self.marks[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    def update(self, step: int, fields: dict[str, str]) -> None:
        now = self.now()
        self.marks.append((now, step))
        rate = self.steps_per_s()
        eta = f"ETA {clock((self.total - step) / rate)}" if rate else "ETA after the first steps"
        percent = 100 * step / self.total if self.total else 100.0
        parts = [f"step {step}/{self.total} ({percent:.0f}%)", *(f"{k} {v}" for k, v in fields.items()),
                 f"elapsed {clock(now - self.started)}", eta]
        text = " · ".join(parts)
        if self.tty:
            width = shutil.get_terminal_size((120, 24)).columns - 1
            self.line = text[:width]
            self.stream.write("\r" + self.line + "\x1b[K")
        else:
            self.stream.write("bigssl: " + text + "\n")
        self.stream.flush()

    def write(self, text: str) -> None:
        """A message; on a terminal above the live line, which is drawn again below it."""
        if self.tty and self.line:
            self.stream.write("\r\x1b[K" + text + "\n" + self.line)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.line:
            self.stream.write("\n")
            self.stream.flush()
        self.line = ""
