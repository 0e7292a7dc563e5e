"""Errors that end a run, and the exit code each one leaves (README, "Exit codes").

Torch-free: the CLI maps errors to codes before anything heavy is imported.
"""

EXIT_INTERNAL = 1  # an unexpected error: a bug, or a fault bigssl does not recognise
EXIT_USER = 2  # bad input (config, recipe, data, files): one line naming the culprit
EXIT_RANK_LOST = 3  # another rank of the job exited or stopped responding
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on a scheduler's signal after a checkpoint; resumable
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


class UserError(Exception):
    """Bad input (config key, file, shard, environment). The message must name the culprit."""


class ConfigError(UserError):
    """A recipe or override that does not fit the schema.

    `per_node`: the error depends on this machine's files (a recipe missing on one node), so
    every rank reports it; other config errors are the same on every rank and only rank 0 does."""

    def __init__(self, message: str, *, per_node: bool = False) -> None:
        super().__init__(message)
        self.per_node = per_node


class CheckpointError(UserError):
    """A checkpoint that is not loaded: unverified (no manifest), damaged, or holding something
    other than tensors and plain values. The message names the checkpoint and the file."""


class RankLost(RuntimeError):
    """Another rank of the job exited or stopped responding."""
