"""The hybrid inference cache: softmax-layer K/V buffers + lightning-layer fp32 states, as one pytree.

Slots: every sequence of the batch writes its t-th cached token at slot t (prompts are left-padded, so all
sequences advance together); `valid_BxS` marks slots that hold real tokens (padding never becomes visible).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from m1jax.config import LIGHTNING, ModelConfig, dtype_name
from m1jax.sharding import named_sharding
from m1jax.weights import DTYPE


@struct.dataclass
class Cache:
    """`layers[i]`: `(k, v)` `[B, S, K, D]` for a softmax layer, the state `[B, H, D, D]` fp32 for a lightning
    layer. `valid_BxS`: slot holds a real token. `length`: slots written so far (int32 scalar)."""

    layers: tuple
    valid_BxS: jax.Array
    length: jax.Array

    @property
    def batch_size(self) -> int:
        return self.valid_BxS.shape[0]

    @property
    def max_len(self) -> int:
        return self.valid_BxS.shape[1]


# Logical axes of the cache arrays (see `m1jax.sharding.RULES`).
KV_AXES = ("batch", "seq", "kv_heads", "head_dim")
STATE_AXES = ("batch", "heads", "state_k", "state_v")
VALID_AXES = ("batch", "seq")


def _build(config: ModelConfig, batch_size: int, max_len: int, dtype, leaf) -> Cache:
    """The cache with every array made by `leaf(shape, dtype, logical_axes)` (declared once, built many ways)."""
    dt = DTYPE[dtype_name(dtype or config.dtype)]
    h, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    layers = []
    for kind in config.layer_types:
        if kind == LIGHTNING:
            layers.append(leaf((batch_size, h, hd, hd), jnp.float32, STATE_AXES))
        else:
            layers.append(tuple(leaf((batch_size, max_len, kv, hd), dt, KV_AXES) for _ in "kv"))
    return Cache(layers=tuple(layers), valid_BxS=leaf((batch_size, max_len), jnp.bool_, VALID_AXES),
                 length=leaf((), jnp.int32, ()))


def abstract_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None, *, mesh=None,
                   rules=None) -> Cache:
    """The cache as `jax.ShapeDtypeStruct`s (with their `NamedSharding` on `mesh` by the rules, if given)."""
    def leaf(shape, dt, axes):
        sharding = None if mesh is None else named_sharding(axes, shape, mesh, rules)
        return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)

    return _build(config, batch_size, max_len, dtype, leaf)


def cache_shardings(config: ModelConfig, batch_size: int, max_len: int, mesh, rules=None) -> Cache:
    """`NamedSharding` of every cache array on `mesh` (batch over the batch axes, heads over tensor, ...)."""
    return jax.tree.map(lambda s: s.sharding, abstract_cache(config, batch_size, max_len, mesh=mesh, rules=rules))


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None, *, mesh=None, rules=None) -> Cache:
    """An empty cache for `batch_size` sequences of up to `max_len` tokens (K/V in the compute dtype).

    With `mesh`, every array is created directly in its sharding (a jitted zeros with `out_shardings`): no
    device ever holds more than its own shard.
    """
    def zeros():
        return _build(config, batch_size, max_len, dtype, lambda shape, dt, axes: jnp.zeros(shape, dt))

    if mesh is None:
        return zeros()
    return jax.jit(zeros, out_shardings=cache_shardings(config, batch_size, max_len, mesh, rules))()


def cache_memory(config: ModelConfig, dtype=None) -> dict[str, int]:
    """Bytes the cache needs: `per_token` (softmax K/V, every sequence) and `per_sequence` (lightning states)."""
    itemsize = jnp.dtype(DTYPE[dtype_name(dtype or config.dtype)]).itemsize
    kv_bytes = 2 * config.num_key_value_heads * config.head_dim * itemsize * len(config.softmax_layers)
    state_bytes = config.num_attention_heads * config.head_dim ** 2 * 4 * len(config.lightning_layers)
    return {"per_token": kv_bytes, "per_sequence": state_bytes}
