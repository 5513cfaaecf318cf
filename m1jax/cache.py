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
    layer. `valid_BxS`: slot holds a real token. `length`: slots written so far (int32 scalar).

    For a scanned model (`groups` = `ModelConfig.scan_groups` > 0) `layers[p]` is position p of the layer
    period with a leading group axis (`[G, B, S, K, D]`, `[G, B, H, D, D]`; layer i = g·P + p); `per_layer()`
    is the per-layer view in either layout."""

    layers: tuple
    valid_BxS: jax.Array
    length: jax.Array
    groups: int = struct.field(pytree_node=False, default=0)

    def per_layer(self) -> tuple:
        """One entry per layer, in layer order (slices of the stacked entries when `groups` > 0)."""
        return unstack_groups(self.layers, self.groups)

    @classmethod
    def from_per_layer(cls, layers, valid_BxS, length, groups: int = 0) -> Cache:
        """A cache from per-layer entries, stacked per period position when `groups` > 0."""
        if groups:
            period = len(layers) // groups
            layers = tuple(jax.tree.map(lambda *xs: jnp.stack(xs), *layers[p::period]) for p in range(period))
        return cls(layers=tuple(layers), valid_BxS=valid_BxS, length=length, groups=groups)

    def map_slots(self, fn) -> Cache:
        """The cache with `fn(x, axis)` applied to every array indexed by slot (the K/V buffers and `valid_BxS`),
        `axis` being its slot axis."""
        axis = 2 if self.groups else 1
        layers = tuple(tuple(fn(t, axis) for t in layer) if isinstance(layer, tuple) else layer
                       for layer in self.layers)
        return self.replace(layers=layers, valid_BxS=fn(self.valid_BxS, 1))

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
    """The cache with every array made by `leaf(shape, dtype, logical_axes)` (declared once, built many ways),
    in the layout of `config`'s model (stacked per layer group when `config.scan_groups` > 0)."""
    dt = DTYPE[dtype_name(dtype or config.dtype)]
    h, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    groups = config.scan_groups
    lead, lead_axes = ((groups,), ("layers",)) if groups else ((), ())
    layers = []
    for kind in config.layer_types[:config.layer_period] if groups else config.layer_types:
        if kind == LIGHTNING:
            layers.append(leaf((*lead, batch_size, h, hd, hd), jnp.float32, (*lead_axes, *STATE_AXES)))
        else:
            kv_shape = (*lead, batch_size, max_len, kv, hd)
            layers.append(tuple(leaf(kv_shape, dt, (*lead_axes, *KV_AXES)) for _ in "kv"))
    return Cache(layers=tuple(layers), valid_BxS=leaf((batch_size, max_len), jnp.bool_, VALID_AXES),
                 length=leaf((), jnp.int32, ()), groups=groups)


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


def unstack_groups(entries: tuple, groups: int) -> tuple:
    """Per period position, pytrees stacked over `groups` → one pytree per layer in layer order (i = g·P + p);
    `groups` = 0: `entries` are per layer already."""
    if not groups:
        return tuple(entries)
    return tuple(jax.tree.map(lambda x, g=g: x[g], entry) for g in range(groups) for entry in entries)
