"""Errors that are the user's to fix: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input (config key, file, shard, environment). The message must name the culprit."""


class ConfigError(UserError):
    """A recipe or override that does not fit the schema."""


class CheckpointError(UserError):
    """A checkpoint that is not loaded: unverified (no manifest), damaged, or holding something
    other than tensors and plain values. The message names the checkpoint and the file."""
