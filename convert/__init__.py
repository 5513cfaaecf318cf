"""HF ⇄ m1jax weight conversion: safetensors I/O, the name mapping of both HF layouts, checkpoint validation,
and the streaming `m1jax convert` (HF → orbax) / `m1jax export` (m1jax → HF) pipelines.

Public entry points (imported lazily): `convert_checkpoint`, `export_checkpoint`, `export_model`.
"""

import importlib

_EXPORTS = {
    "convert_checkpoint": "convert.hf_to_m1jax",
    "export_checkpoint": "convert.m1jax_to_hf",
    "export_model": "convert.m1jax_to_hf",
    "ConvertError": "convert.errors",
    "IncompleteCheckpointError": "convert.errors",
    "CheckpointError": "convert.hf_checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'convert' has no attribute {name!r}")
