"""The hybrid inference cache: softmax-layer K/V buffers + lightning-layer fp32 states, as one pytree.

Slots: every sequence of the batch writes its t-th cached token at slot t (prompts are left-padded, so all
sequences advance together); `valid_BxS` marks slots that hold real tokens (padding never becomes visible).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from m1jax.config import LIGHTNING, ModelConfig, dtype_name
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


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> Cache:
    """An empty cache for `batch_size` sequences of up to `max_len` tokens (K/V in the compute dtype)."""
    dt = DTYPE[dtype_name(dtype or config.dtype)]
    h, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    layers = []
    for kind in config.layer_types:
        if kind == LIGHTNING:
            layers.append(jnp.zeros((batch_size, h, hd, hd), jnp.float32))
        else:
            layers.append((jnp.zeros((batch_size, max_len, kv, hd), dt), jnp.zeros((batch_size, max_len, kv, hd), dt)))
    return Cache(layers=tuple(layers), valid_BxS=jnp.zeros((batch_size, max_len), bool),
                 length=jnp.zeros((), jnp.int32))


def cache_memory(config: ModelConfig, dtype=None) -> dict[str, int]:
    """Bytes the cache needs: `per_token` (softmax K/V, every sequence) and `per_sequence` (lightning states)."""
    itemsize = jnp.dtype(DTYPE[dtype_name(dtype or config.dtype)]).itemsize
    kv_bytes = 2 * config.num_key_value_heads * config.head_dim * itemsize * len(config.softmax_layers)
    state_bytes = config.num_attention_heads * config.head_dim ** 2 * 4 * len(config.lightning_layers)
    return {"per_token": kv_bytes, "per_sequence": state_bytes}
