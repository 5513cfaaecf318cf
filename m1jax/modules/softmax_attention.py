"""Softmax (full) attention of MiniMax-M1 (spec §4): GQA, partial rotate-half RoPE, scale 1/√D, fp32 softmax.

The attention core sees queries and keys by *slot*: slot j of the key sequence is visible to the query in
slot i iff `kv_valid[b, j]` and `j ≤ i`. Without a cache the slots are 0..L−1; with a cache the new tokens
occupy slots `start .. start+L−1` of a `[B, S, K, D]` buffer. Padding is an invalid slot, so it never enters
a score. Long key ranges run blockwise with an online softmax (bounded memory, same result).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m1jax.config import ModelConfig
from m1jax.modules.rope import apply_rope
from m1jax.modules.unfused import linear
from m1jax.weights import DTYPE, param

NEG = jnp.finfo(jnp.float32).min
DIRECT_MAX_KEYS = 2048  # at most this many key slots: dense masked softmax (in query chunks when causal)
QUERY_CHUNK = 256
KEY_BLOCK = 1024


def _visible(kv_valid_BxS, slots_S, q_slot_L):
    """Mask `[B, 1, 1, L, S]`: key slot j is visible to query slot i iff valid and j ≤ i."""
    causal_LxS = slots_S[None, :] <= q_slot_L[:, None]
    return kv_valid_BxS[:, None, None, None, :] & causal_LxS[None, None, None]


def _dense(q_BxKxGxLxD, k_BxKxSxD, v_BxKxSxD, q_slot_L, kv_valid_BxS, scale):
    """Masked softmax attention with every visible key at once: `[B, K, G, L, D]` fp32."""
    s = jnp.einsum("bkgld,bksd->bkgls", q_BxKxGxLxD, k_BxKxSxD, preferred_element_type=jnp.float32) * scale
    s = jnp.where(_visible(kv_valid_BxS, jnp.arange(k_BxKxSxD.shape[2]), q_slot_L), s, NEG)
    p = jnp.exp(s - s.max(-1, keepdims=True))
    out = jnp.einsum("bkgls,bksd->bkgld", p.astype(v_BxKxSxD.dtype), v_BxKxSxD, preferred_element_type=jnp.float32)
    return out / p.sum(-1)[..., None]


def attend(q_BxLxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *, q_slot_L: jax.Array,
           kv_valid_BxS: jax.Array | None, num_slots: jax.Array | int | None = None,
           causal_prefix: bool = False) -> jax.Array:
    """softmax(q kᵀ/√D + mask) v over visible slots; returns `[B, L, H, D]` in q's dtype.

    `num_slots` (optional, may be traced) bounds the slots that can be visible, so a long cache is only read
    up to its filled part. `causal_prefix=True` declares that query i sits in slot i of these same keys (no
    cache), so query chunks skip the keys after them.
    """
    b, l, h, d = q_BxLxHxD.shape
    s, kh = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
    g = h // kh
    scale = d ** -0.5
    q = q_BxLxHxD.reshape(b, l, kh, g, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, L, D]: batched GEMMs
    if kv_valid_BxS is None:
        kv_valid_BxS = jnp.ones((b, s), bool)

    if s <= DIRECT_MAX_KEYS:
        k = k_BxSxKxD.transpose(0, 2, 1, 3)
        v = v_BxSxKxD.transpose(0, 2, 1, 3)
        if causal_prefix and l > QUERY_CHUNK:
            outs = [_dense(q[:, :, :, i:i + QUERY_CHUNK], k[:, :, :i + QUERY_CHUNK], v[:, :, :i + QUERY_CHUNK],
                           q_slot_L[i:i + QUERY_CHUNK], kv_valid_BxS[:, :i + QUERY_CHUNK], scale)
                    for i in range(0, l, QUERY_CHUNK)]
            out = jnp.concatenate(outs, axis=3)
        else:
            out = _dense(q, k, v, q_slot_L, kv_valid_BxS, scale)
        return out.transpose(0, 3, 1, 2, 4).reshape(b, l, h, d).astype(q_BxLxHxD.dtype)

    # Long key range (a big cache): visit key blocks, only up to `num_slots`, with an online softmax; each block
    # is sliced from the cache in its own layout, so a step reads just the filled part of the cache. The last
    # block is slid back to end at slot S (no padded copy of the cache); slots an earlier block covered are masked.
    kb = KEY_BLOCK
    n_blocks_static = -(-s // kb)
    k, v = k_BxSxKxD, v_BxSxKxD

    def body(i, carry):
        m, den, acc = carry
        first = i * kb
        start = jnp.minimum(first, s - kb)
        kblk = jax.lax.dynamic_slice_in_dim(k, start, kb, axis=1).transpose(0, 2, 1, 3)
        vblk = jax.lax.dynamic_slice_in_dim(v, start, kb, axis=1).transpose(0, 2, 1, 3)
        slots = start + jnp.arange(kb)
        valid_blk = jax.lax.dynamic_slice_in_dim(kv_valid_BxS, start, kb, axis=1) & (slots >= first)[None, :]
        sc = jnp.einsum("bkgld,bksd->bkgls", q, kblk, preferred_element_type=jnp.float32) * scale
        sc = jnp.where(_visible(valid_blk, slots, q_slot_L), sc, NEG)
        m_new = jnp.maximum(m, sc.max(-1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(sc - m_new[..., None])
        den = den * corr + p.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum("bkgls,bksd->bkgld", p.astype(vblk.dtype), vblk,
                                                 preferred_element_type=jnp.float32)
        return m_new, den, acc

    init = (jnp.full((b, kh, g, l), NEG, jnp.float32), jnp.zeros((b, kh, g, l), jnp.float32),
            jnp.zeros((b, kh, g, l, d), jnp.float32))
    if num_slots is None:
        n_blocks = n_blocks_static
    else:
        n_blocks = jnp.minimum((num_slots + kb - 1) // kb, n_blocks_static)
    _, den, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    out = acc / den[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, l, h, d).astype(q_BxLxHxD.dtype)


class SoftmaxAttention(nnx.Module):
    """Softmax attention layer: weights `q_proj`, `k_proj`, `v_proj`, `o_proj` (RC names)."""

    def __init__(self, config: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
        d, h, kv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        pdt, std = config.param_dtype, config.initializer_range
        self.config = config
        self.layer_idx = layer_idx
        self.q_proj = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pdt, std=std)
        self.k_proj = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pdt, std=std)
        self.v_proj = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pdt, std=std)
        self.o_proj = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), pdt, std=std)

    def __call__(self, x_BxLxD: jax.Array, *, cos_BxLxR: jax.Array, sin_BxLxR: jax.Array,
                 valid_BxL: jax.Array | None = None, kv_cache: tuple[jax.Array, jax.Array] | None = None,
                 cache_start: jax.Array | None = None, cache_valid_BxS: jax.Array | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Returns (y `[B, L, D_model]`, updated (k, v) cache or None).

        Without `kv_cache`: causal attention among the L tokens (invalid tokens masked as keys).
        With `kv_cache` = (k, v) `[B, S, K, D]`: the new k, v are written at slots `cache_start..+L`, and the
        queries attend to every valid slot up to their own; `cache_valid_BxS` must already include the new slots.
        """
        dt = DTYPE[self.config.dtype]
        x_BxLxD = x_BxLxD.astype(dt)
        l = x_BxLxD.shape[1]
        q = apply_rope(linear(x_BxLxD, self.q_proj[...].astype(dt)), cos_BxLxR, sin_BxLxR)
        k = apply_rope(linear(x_BxLxD, self.k_proj[...].astype(dt)), cos_BxLxR, sin_BxLxR)
        v = linear(x_BxLxD, self.v_proj[...].astype(dt))
        if kv_cache is None:
            out = attend(q, k, v, q_slot_L=jnp.arange(l), kv_valid_BxS=valid_BxL, causal_prefix=True)
            new_cache = None
        else:
            k_cache, v_cache = kv_cache
            k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), cache_start, axis=1)
            v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), cache_start, axis=1)
            out = attend(q, k_cache, v_cache, q_slot_L=cache_start + jnp.arange(l), kv_valid_BxS=cache_valid_BxS,
                         num_slots=cache_start + l)
            new_cache = (k_cache, v_cache)
        y = linear(out, self.o_proj[...].astype(dt), contract=2)
        return y, new_cache
