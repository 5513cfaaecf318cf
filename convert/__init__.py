"""HF ⇄ m1jax weight conversion: safetensors I/O, the name mapping of both HF layouts, checkpoint validation,
and the streaming `m1jax convert` (HF → orbax) / `m1jax export` (m1jax → HF) pipelines.

Public entry points (imported lazily): `convert_checkpoint`, `export_checkpoint`, `export_model`.
"""

import importlib

_EXPORTS = {
    "convert_checkpoint": "m1jax.convert.hf_to_m1jax",
    "export_checkpoint": "m1jax.convert.m1jax_to_hf",
    "export_model": "m1jax.convert.m1jax_to_hf",
    "ConvertError": "m1jax.convert.errors",
    "IncompleteCheckpointError": "m1jax.convert.errors",
    "CheckpointError": "m1jax.convert.hf_checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'convert' has no attribute {name!r}")
