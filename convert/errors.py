"""The errors of `m1jax convert` / `m1jax export`: user errors, each message naming the file or tensor at fault."""

from __future__ import annotations

from m1jax.convert.hf_checkpoint import CheckpointError
from m1jax.convert.safetensors_io import SafetensorsError


class ConvertError(ValueError):
    """A conversion or export cannot proceed (bad destination, mismatched resume, wrong kind of input)."""


class IncompleteCheckpointError(CheckpointError):
    """A directory holds an interrupted conversion (no commit marker): it must not be read as a checkpoint."""


USER_ERRORS = (ConvertError, CheckpointError, SafetensorsError)
