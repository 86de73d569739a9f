"""The errors a user can cause. The CLI prints them in one line and exits with status 2."""


class UserError(Exception):
    """Bad input from the user: a config, a path, a checkpoint, a prompt, a data source.

    The message must name the offending thing and what is allowed instead, because the CLI
    prints it alone, without a traceback.
    """


class ConfigError(UserError):
    """An invalid configuration file, key, value or command-line override."""


class DataError(UserError):
    """A corpus that cannot be read, is empty, or is too short for the requested windows."""


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, corrupted or incompatible with the config."""


class RunDirError(UserError):
    """A run directory that exists when it should not, or cannot be written."""


class GenerationError(UserError):
    """A prompt or generation setting that cannot be used (empty, too long, out of range)."""
