"""Checkpoint directories: atomic publication, retention, and finding the one to resume from.

A checkpoint is a directory `checkpoints/step_XXXXXXXX/` whose content the engine writes (one
file for DDP, one shard per rank for sharded engines). It is written as
`step_XXXXXXXX.partial/` and renamed only when every rank has finished, so a crash mid-write
never leaves something that looks complete, and the previous checkpoint is deleted only after
the new one is published.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from bigssl.distributed import comm
from bigssl.distributed.engines.base import Engine

PATTERN = re.compile(r"^step_(\d{8})$")


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int, is_main: bool) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = max(1, keep)
        self.is_main = is_main

    def published(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and PATTERN.match(p.name)]
        return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))

    def latest(self) -> Path | None:
        found = self.published()
        return found[-1] if found else None

    def save(self, step: int, engine: Engine, extra: dict[str, Any]) -> Path:
        final = self.root / f"step_{step:08d}"
        partial = final.with_name(final.name + ".partial")
        if self.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        comm.barrier()
        engine.save(partial, extra)
        comm.barrier()  # every rank's part is on disk before the rename publishes it
        if self.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in self.published()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        comm.barrier()
        return final
