"""`from_pretrained`: build an `MiniMaxM1` from an HF checkpoint directory (either layout), optionally sharded.

Parameters are created abstractly (no random init) and filled from lazy views over the memory-mapped
safetensors shards. With a mesh, each device's shard is read directly (`jax.make_array_from_callback`), so no
host ever holds a full copy of a sharded parameter.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1jax.config import ModelConfig
from m1jax.model import MiniMaxM1
from m1jax.sharding import named_sharding


def abstract_model(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract state) of a model: shapes, dtypes and logical axes, no memory allocated."""
    model = nnx.eval_shape(lambda: MiniMaxM1(config, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def _full_index(shape):
    return tuple(slice(None) for _ in shape)


def materialize(view, shape, dtype, sharding=None) -> jax.Array:
    """A device array from a lazy numpy-indexable `view`, reading only each device's slice when sharded."""
    def read(index):
        return np.asarray(view[index]).astype(dtype)

    if sharding is None:
        return jnp.asarray(read(_full_index(shape)))
    return jax.make_array_from_callback(tuple(shape), sharding, read)


def build_from_views(config: ModelConfig, views: dict[tuple, object], *, mesh=None, rules=None) -> MiniMaxM1:
    """Assemble a model from `{param path: lazy view}` (every parameter must be present)."""
    graphdef, state = abstract_model(config)
    flat = dict(nnx.to_flat_state(state))
    missing = sorted(set(flat) - set(views), key=str)
    extra = sorted(set(views) - set(flat), key=str)
    if missing or extra:
        raise ValueError(f"parameter views do not match the model: missing {missing[:5]}, extra {extra[:5]}")
    for path, var in flat.items():
        abstract = var.get_value()
        sharding = None
        if mesh is not None:
            sharding = named_sharding(var.get_metadata()["logical_axes"], abstract.shape, mesh, rules)
        var.set_value(materialize(views[path], abstract.shape, abstract.dtype, sharding))
    return nnx.merge(graphdef, state)


def from_pretrained(path: str | os.PathLike, *, dtype: str | None = None, param_dtype: str | None = None,
                    mesh=None, rules=None, lightning_impl: str = "auto", moe_impl: str = "auto") -> MiniMaxM1:
    """Load an HF MiniMax checkpoint (original or transformers-native layout) as an `MiniMaxM1`.

    dtype: compute dtype (default: the checkpoint's dominant float dtype); param_dtype: weight storage dtype
    (default: `dtype`). Router gates stay fp32. On any mismatch between the weights and `config.json`, raises
    `convert.hf_checkpoint.CheckpointError` listing every missing, unexpected and mis-shaped tensor.
    """
    from convert.hf_checkpoint import HFCheckpoint

    path = Path(path)
    ckpt = HFCheckpoint(path)
    dtype = dtype or ckpt.main_dtype()
    config = ckpt.config.replace(dtype=dtype, param_dtype=param_dtype or dtype, lightning_impl=lightning_impl,
                                 moe_impl=moe_impl)
    ckpt.config = config
    specs = ckpt.validate()
    views = {spec.path: spec.view([ckpt.get(n) for n in spec.sources]) for spec in specs}
    return build_from_views(config, views, mesh=mesh, rules=rules)

