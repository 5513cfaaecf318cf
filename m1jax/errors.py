"""The errors the `m1jax` command line reports as one line (exit code 2, no traceback)."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (a bad path, file, flag or request), not with m1jax."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Every exception type that means bad user input: configs, checkpoints, conversions, run configs, data,
    generation requests, and OS errors on the paths given (missing, not a directory, no permission)."""
    from m1jax.config import ConfigError
    from m1jax.convert.errors import USER_ERRORS
    from m1jax.generation import GenerationError
    from m1jax.train.data_sources import DataError
    from m1jax.train.run_config import RunConfigError

    return (UserError, ConfigError, GenerationError, RunConfigError, DataError, OSError, *USER_ERRORS)
