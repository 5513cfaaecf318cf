"""`from_pretrained`: build an `MiniMaxM1` from an HF checkpoint directory (either layout) or a converted m1jax
checkpoint (orbax parameters, see `m1jax.convert.m1jax_checkpoint`), optionally sharded.

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
from m1jax.layer_stack import stacked_views
from m1jax.model import MiniMaxM1
from m1jax.quantize import quantize_views
from m1jax.sharding import named_sharding


class _AbstractRngs:
    """Stands in for `nnx.Rngs` while tracing a model for shapes only: every stream returns one fixed key.

    `nnx.Rngs` bumps a counter variable on every draw, and each such update of a traced value costs a scan of
    the whole trace (flax asks the tracer for its sharding, jax builds an origin message), which is quadratic
    in the parameter count: 38 s instead of 0.7 s for the 80-layer MiniMax-M1 on a 2-core CPU.
    """

    def __call__(self):
        return jax.random.key(0)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return self.__call__


def abstract_model(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract state) of a model: shapes, dtypes and logical axes, no memory allocated."""
    model = nnx.eval_shape(lambda: MiniMaxM1(config, rngs=_AbstractRngs()))
    return nnx.split(model)


def param_shardings(state: nnx.State, mesh, rules=None) -> nnx.State:
    """`state` with each parameter's value replaced by its `NamedSharding` on `mesh` (logical axes → rules)."""
    def shard(var):
        return var.replace(named_sharding(var.get_metadata()["logical_axes"], var.shape, mesh, rules))

    return jax.tree.map(shard, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_sharded_model(config: ModelConfig, mesh, rules=None) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state of `jax.ShapeDtypeStruct`s carrying their `NamedSharding`): the inputs of an AOT
    `jax.jit(f).lower(...)` for a model laid out on `mesh`; nothing is allocated."""
    graphdef, state = abstract_model(config)
    shardings = param_shardings(state, mesh, rules)
    return graphdef, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)


def init_sharded(config: ModelConfig, mesh, *, seed: int = 0, rules=None) -> MiniMaxM1:
    """`MiniMaxM1(config, rngs=nnx.Rngs(seed))` created directly in its sharding on `mesh`: the initializer is
    jitted with `out_shardings` from the logical axes, so each device computes and holds only its own shards
    (the values equal the unsharded init with the same seed)."""
    graphdef, state = abstract_model(config)

    def init():
        return nnx.state(MiniMaxM1(config, rngs=nnx.Rngs(seed)))

    return nnx.merge(graphdef, jax.jit(init, out_shardings=param_shardings(state, mesh, rules))())


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
    """Assemble a model from `{param path: lazy view}` (every parameter must be present). Paths are per layer
    (`("layers", i, ...)`, the checkpoint layout) or the model's own (stacked layers of a scanned model)."""
    graphdef, state = abstract_model(config)
    flat = dict(nnx.to_flat_state(state))
    views = stacked_views(config, views, flat)
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
                    mesh=None, rules=None, lightning_impl: str = "auto", moe_impl: str = "auto",
                    quantize: str | None = None, scan_layers: str | bool = "auto", remat: str = "none",
                    moe_parallel: str = "auto") -> MiniMaxM1:
    """Load a MiniMax checkpoint as an `MiniMaxM1`: an HF directory (original or transformers-native layout) or
    an m1jax checkpoint written by `m1jax convert` (recognised by its `m1jax_checkpoint.json` commit marker).

    dtype: compute dtype (default: the checkpoint's dominant / stored float dtype); param_dtype: weight storage
    dtype (default: `dtype`). Router gates stay fp32. `scan_layers`, `remat`, `moe_parallel`: see `ModelConfig`
    (the checkpoint's per-layer parameters are stacked for a scanned model as they are read). With `mesh`, every
    device reads only its own shard of each parameter (memory-mapped safetensors views or tensorstore reads of the
    device's index domain).
    quantize: "int8-experts" quantizes the routed experts' weights as they are read (`m1jax.quantize`: each
    device's region from the full input extent of its columns, one expert at a time, so no float copy of an
    expert stack is ever held); None loads the checkpoint as stored (int8 if `m1jax convert --quantize` made it).
    On any mismatch between the weights and `config.json`, raises `m1jax.convert.hf_checkpoint.CheckpointError`
    listing every missing, unexpected and mis-shaped tensor; an interrupted conversion raises its subclass
    `m1jax.convert.errors.IncompleteCheckpointError`.
    """
    from m1jax.convert.m1jax_checkpoint import COMPLETE, INCOMPLETE, M1jaxCheckpoint, directory_state

    path = Path(path)
    runtime = {"lightning_impl": lightning_impl, "moe_impl": moe_impl, "scan_layers": scan_layers, "remat": remat,
               "moe_parallel": moe_parallel}
    if directory_state(path) in (COMPLETE, INCOMPLETE):
        ckpt = M1jaxCheckpoint(path)  # refuses an incomplete one with a clear message
        dtype = dtype or ckpt.dtype
        config = ckpt.config.replace(dtype=dtype, param_dtype=param_dtype or dtype, **runtime,
                                     quantize=quantize or ckpt.quantize)
        views = ckpt.views(config)
        if config.quantize is not None and ckpt.quantize is None:
            views = quantize_views(views)
        return build_from_views(config, views, mesh=mesh, rules=rules)

    from m1jax.convert.hf_checkpoint import HFCheckpoint

    ckpt = HFCheckpoint(path)
    dtype = dtype or ckpt.main_dtype()
    config = ckpt.config.replace(dtype=dtype, param_dtype=param_dtype or dtype, **runtime, quantize=quantize)
    ckpt.config = config
    specs = ckpt.validate()
    views = {spec.path: spec.view([ckpt.get(n) for n in spec.sources]) for spec in specs}
    if quantize is not None:
        views = quantize_views(views)
    return build_from_views(config, views, mesh=mesh, rules=rules)
