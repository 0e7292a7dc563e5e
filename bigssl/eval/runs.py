"""A run on disk as export and evaluation read it: its newest verified checkpoint and the
config it was trained with. Below both (export.py and offline.py import it, it imports
neither), so the two never need each other."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bigssl import recipes
from bigssl.checkpoint import PATTERN, Checkpointer, verify_alone
from bigssl.config import Config
from bigssl.errors import CheckpointError, UserError


@dataclass
class SavedRun:
    run_dir: Path
    checkpoint: Path
    step: int
    config: Config


def checkpoint_dir(run_or_checkpoint: Path) -> Path:
    """A run directory means its newest published checkpoint; a checkpoint directory itself.
    Either is verified (manifest, checksums, safe parsing: bigssl/checkpoint.py) before anything
    reads it, and refused when it fails: export and eval name the problem, they do not pick
    another checkpoint behind the user's back."""
    older: list[Path] = []
    if (run_or_checkpoint / "checkpoints").is_dir():
        *older, checkpoint = Checkpointer(run_or_checkpoint, keep=1, is_main=False).published() or [None]
        if checkpoint is None:
            raise UserError(f"{run_or_checkpoint}: the run has no published checkpoint")
    elif not run_or_checkpoint.is_dir():
        raise UserError(f"{run_or_checkpoint}: no such run or checkpoint directory")
    else:
        checkpoint = run_or_checkpoint
    problem = verify_alone(checkpoint)
    if problem is not None:
        hint = f"; an older checkpoint of the run may be given instead: {older[-1]}" if older else ""
        raise CheckpointError(f"checkpoint not loaded: {checkpoint}{os.sep}{problem}{hint}")
    return checkpoint


def locate(source: Path) -> SavedRun:
    """The run of a run directory or of one of its checkpoints, with its recorded config.yaml."""
    checkpoint = checkpoint_dir(source)
    run_dir = source if (source / "checkpoints").is_dir() else checkpoint.parent.parent
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"{source}: no config.yaml in the run directory {run_dir} (needed to rebuild the backbone)")
    match = PATTERN.match(checkpoint.name)
    return SavedRun(run_dir, checkpoint, int(match.group(1)) if match else 0, recipes.load(config_path, []))
