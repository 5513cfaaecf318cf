"""m1jax: MiniMax-M1 in pure JAX (Flax NNX) — exact model, Pallas lightning kernels, generation, conversion, CISPO.

Public names are imported lazily, so `import m1jax.tokenizer` does not pull in the model.
"""

import importlib
import os

__version__ = "0.1.0"

# In a source checkout the design card's folders convert/, train/ and pallas_kernels/ sit beside m1jax/ and are
# imported as m1jax.convert, m1jax.train, m1jax.pallas_kernels (an installed wheel has them inside m1jax/).
_SUBFOLDERS = ("convert", "train", "pallas_kernels")
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(__path__[0], "convert")) and all(
        os.path.isfile(os.path.join(_root, d, "__init__.py")) for d in _SUBFOLDERS):
    __path__.append(_root)

_EXPORTS = {
    "ModelConfig": "m1jax.config",
    "ConfigError": "m1jax.config",
    "list_presets": "m1jax.config",
    "MiniMaxM1": "m1jax.model",
    "ModelOutput": "m1jax.model",
    "Cache": "m1jax.cache",
    "init_cache": "m1jax.cache",
    "cache_memory": "m1jax.cache",
    "from_pretrained": "m1jax.loading",
    "export_model": "m1jax.convert.m1jax_to_hf",
    "init_sharded": "m1jax.loading",
    "abstract_sharded_model": "m1jax.loading",
    "abstract_cache": "m1jax.cache",
    "make_mesh": "m1jax.sharding",
    "Tokenizer": "m1jax.tokenizer",
    "apply_chat_template": "m1jax.chat",
    "parse_output": "m1jax.chat",
    "generate": "m1jax.generation",
    "generate_text": "m1jax.generation",
    "Engine": "m1jax.generation",
    "SamplingParams": "m1jax.sampling",
    "save_state": "m1jax.generation",
    "load_state": "m1jax.generation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'm1jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
