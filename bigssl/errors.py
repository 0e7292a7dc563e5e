"""Errors that are the user's to fix: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input (config key, file, shard, environment). The message must name the culprit."""


class ConfigError(UserError):
    """A recipe or override that does not fit the schema."""
