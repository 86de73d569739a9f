"""The errors a user can cause. The CLI prints them in one line and exits with status 2."""


class UserError(Exception):
    """Bad input from the user: a config, a path, a checkpoint, a prompt, a data source.

    The message must name the offending thing and what is allowed instead, because the CLI
    prints it alone, without a traceback.
    """


class ConfigError(UserError):
    """An invalid configuration file, key, value or command-line override.

    ``key``: the dotted key (``"ode.solver"``) the message starts with, when one key is to
    blame, so that whoever knows where it was given (a file, an override) can say so in front.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class DataError(UserError):
    """A corpus that cannot be read, is empty, or is too short for the requested windows."""


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, corrupted or incompatible with the config."""


class RunDirError(UserError):
    """A run directory that exists when it should not, or cannot be written."""


class GenerationError(UserError):
    """A prompt or generation setting that cannot be used (empty, too long, out of range)."""


def suggest(word, allowed) -> str:
    """`` (did you mean "rk4"?)`` for the allowed name closest to ``word``, else ``""``."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def unknown_name(problem: str, word, allowed, kind: str = "keys") -> ConfigError:
    """``"<problem>; allowed keys are a, b, c (did you mean "b"?)"``, for a name not among ``allowed``."""
    return ConfigError(f"{problem}; allowed {kind} are {', '.join(map(str, allowed))}" + suggest(word, allowed))
