"""Softmax (full) attention of MiniMax-M1 (spec §4): GQA, partial rotate-half RoPE, scale 1/√D, fp32 softmax.

The attention core sees queries and keys by *slot*: slot j of the key sequence is visible to the query in
slot i iff `kv_valid[b, j]` and `j ≤ i`. Without a cache the slots are 0..L−1; with a cache the new tokens
occupy slots `start .. start+L−1` of a `[B, S, K, D]` buffer. Padding is an invalid slot, so it never enters
a score. Long key ranges run blockwise with an online softmax (bounded memory, same result).

Under a mesh that splits the sequence (`sharding.RULES["seq"]`, batch 1 at long context) the layer runs per
shard: a prefill gathers the new K/V (and the cache) over the sequence axes and attends each shard's queries at
their global slots; a decode reads a cache whose slots are split over those axes and combines the shards'
partial softmaxes (flash-decoding), so the cache is never gathered.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from m1jax import lora
from m1jax.cache import KV_AXES
from m1jax.config import ModelConfig
from m1jax.modules.rope import apply_rope
from m1jax.modules.unfused import linear
from m1jax.sharding import axes_size, current_mesh, logical_to_spec, spec_axes
from m1jax.weights import DTYPE, param

NEG = jnp.finfo(jnp.float32).min
DIRECT_MAX_KEYS = 2048  # at most this many key slots: dense masked softmax (in query chunks when causal)
QUERY_CHUNK = 256
KEY_BLOCK = 1024
KEY_BLOCK_LOOP = "kv_blocks"  # name scope of the loop over key blocks (its trip count depends on the filled slots)
QUERY_BLOCK = 2048  # a sequence shard's queries attend in blocks of this many (gathered long K/V)


def _visible(kv_valid_BxS, slots_S, q_slot_L):
    """Mask `[B, 1, 1, L, S]`: key slot j is visible to query slot i iff valid and j ≤ i."""
    causal_LxS = slots_S[None, :] <= q_slot_L[:, None]
    return kv_valid_BxS[:, None, None, None, :] & causal_LxS[None, None, None]


def _dense_stats(q_BxKxGxLxD, k_BxKxSxD, v_BxKxSxD, q_slot_L, kv_valid_BxS, slots_S, scale):
    """Softmax statistics over every key at once: row max m, Σ exp(s − m) and Σ exp(s − m)·v (`[B, K, G, L(, D)]`)."""
    s = jnp.einsum("bkgld,bksd->bkgls", q_BxKxGxLxD, k_BxKxSxD, preferred_element_type=jnp.float32) * scale
    s = jnp.where(_visible(kv_valid_BxS, slots_S, q_slot_L), s, NEG)
    m = s.max(-1)
    p = jnp.exp(s - m[..., None])
    acc = jnp.einsum("bkgls,bksd->bkgld", p.astype(v_BxKxSxD.dtype), v_BxKxSxD, preferred_element_type=jnp.float32)
    return m, p.sum(-1), acc


def _dense(q_BxKxGxLxD, k_BxKxSxD, v_BxKxSxD, q_slot_L, kv_valid_BxS, scale):
    """Masked softmax attention with every visible key at once: `[B, K, G, L, D]` fp32."""
    _, den, acc = _dense_stats(q_BxKxGxLxD, k_BxKxSxD, v_BxKxSxD, q_slot_L, kv_valid_BxS,
                               jnp.arange(k_BxKxSxD.shape[2]), scale)
    return acc / den[..., None]


def _heads_out(acc_BxKxGxLxD, den_BxKxGxL, dtype):
    """acc / den back to `[B, L, H, D]` in `dtype`."""
    b, kh, g, l, d = acc_BxKxGxLxD.shape
    out = acc_BxKxGxLxD / den_BxKxGxL[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, l, kh * g, d).astype(dtype)


def attend(q_BxLxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *, q_slot_L: jax.Array,
           kv_valid_BxS: jax.Array | None, num_slots: jax.Array | int | None = None,
           causal_prefix: bool = False, group: jax.Array | None = None) -> jax.Array:
    """softmax(q kᵀ/√D + mask) v over visible slots; returns `[B, L, H, D]` in q's dtype.

    `num_slots` (optional, may be traced) bounds the slots that can be visible, so a long cache is only read
    up to its filled part. `causal_prefix=True` declares that query i sits in slot i of these same keys (no
    cache), so query chunks skip the keys after them. `group`: k, v are stacks `[G, B, S, K, D]` and the keys
    are those of group `group` (read in place, see `attend_stats`).
    """
    b, l, h, d = q_BxLxHxD.shape
    s, kh = k_BxSxKxD.shape[-3], k_BxSxKxD.shape[-2]
    if causal_prefix and s <= DIRECT_MAX_KEYS and l > QUERY_CHUNK and group is None:
        q = q_BxLxHxD.reshape(b, l, kh, h // kh, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, L, D]: batched GEMMs
        k, v = k_BxSxKxD.transpose(0, 2, 1, 3), v_BxSxKxD.transpose(0, 2, 1, 3)
        valid = jnp.ones((b, s), bool) if kv_valid_BxS is None else kv_valid_BxS
        outs = [_dense(q[:, :, :, i:i + QUERY_CHUNK], k[:, :, :i + QUERY_CHUNK], v[:, :, :i + QUERY_CHUNK],
                       q_slot_L[i:i + QUERY_CHUNK], valid[:, :i + QUERY_CHUNK], d ** -0.5)
                for i in range(0, l, QUERY_CHUNK)]
        out = jnp.concatenate(outs, axis=3)
        return out.transpose(0, 3, 1, 2, 4).reshape(b, l, h, d).astype(q_BxLxHxD.dtype)
    _, den, acc = attend_stats(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, q_slot_L=q_slot_L, kv_valid_BxS=kv_valid_BxS,
                               num_slots=num_slots, group=group)
    return _heads_out(acc, den, q_BxLxHxD.dtype)


def attend_stats(q_BxLxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, *, q_slot_L: jax.Array,
                 kv_valid_BxS: jax.Array | None, num_slots: jax.Array | int | None = None,
                 slot_base: jax.Array | int = 0, group: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Unnormalised softmax attention over these keys: (m, Σ exp(s − m), Σ exp(s − m)·v), `[B, K, G, L(, D)]` fp32.

    Key j sits in slot `slot_base + j` (a shard of a longer cache); `num_slots` bounds the keys read. Statistics
    of disjoint key sets combine exactly: m = max mᵢ, den = Σ denᵢ·e^{mᵢ−m}, acc = Σ accᵢ·e^{mᵢ−m}.
    `group`: k, v are stacks `[G, B, S, K, D]` of which group `group` holds the keys; each key block is sliced
    from the stacks directly, so the group's cache is never copied out.
    """
    b, l, h, d = q_BxLxHxD.shape
    s, kh = k_BxSxKxD.shape[-3], k_BxSxKxD.shape[-2]
    g = h // kh
    scale = d ** -0.5
    q = q_BxLxHxD.reshape(b, l, kh, g, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, L, D]: batched GEMMs
    if kv_valid_BxS is None:
        kv_valid_BxS = jnp.ones((b, s), bool)

    if group is not None and s <= DIRECT_MAX_KEYS:  # a short cache: this group's, whole
        k_BxSxKxD, v_BxSxKxD = (jax.lax.dynamic_index_in_dim(x, group, axis=0, keepdims=False)
                                for x in (k_BxSxKxD, v_BxSxKxD))
    if s <= DIRECT_MAX_KEYS:
        return _dense_stats(q, k_BxSxKxD.transpose(0, 2, 1, 3), v_BxSxKxD.transpose(0, 2, 1, 3), q_slot_L,
                            kv_valid_BxS, slot_base + jnp.arange(s), scale)

    # Long key range (a big cache): visit key blocks, only up to `num_slots`, with an online softmax; each block
    # is sliced from the cache in its own layout, so a step reads just the filled part of the cache. The last
    # block is slid back to end at slot S (no padded copy of the cache); slots an earlier block covered are masked.
    kb = KEY_BLOCK
    n_blocks_static = -(-s // kb)
    k, v = k_BxSxKxD, v_BxSxKxD

    def block(x, start):  # [B, kb, K, D] from slot `start` (of group `group`)
        if group is None:
            return jax.lax.dynamic_slice_in_dim(x, start, kb, axis=1)
        zero = jnp.zeros((), jnp.int32)
        at = (jnp.asarray(group, jnp.int32), zero, jnp.asarray(start, jnp.int32), zero, zero)
        return jax.lax.dynamic_slice(x, at, (1, x.shape[1], kb, *x.shape[3:]))[0]

    def body(i, carry):
        m, den, acc = carry
        first = i * kb
        start = jnp.minimum(first, s - kb)
        kblk = block(k, start).transpose(0, 2, 1, 3)
        vblk = block(v, start).transpose(0, 2, 1, 3)
        local = start + jnp.arange(kb)
        valid_blk = jax.lax.dynamic_slice_in_dim(kv_valid_BxS, start, kb, axis=1) & (local >= first)[None, :]
        sc = jnp.einsum("bkgld,bksd->bkgls", q, kblk, preferred_element_type=jnp.float32) * scale
        sc = jnp.where(_visible(valid_blk, slot_base + local, q_slot_L), sc, NEG)
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
    # Block 0 outside the loop: the carry then has the type the blocks give it (also inside shard_map, where the
    # statistics vary over the mesh axes the keys are split over). With no visible slot its m stays NEG.
    with jax.named_scope(KEY_BLOCK_LOOP):  # names the loop in the HLO (`m1jax.plan` counts its trips)
        return jax.lax.fori_loop(1, n_blocks, body, body(0, init))


# ----------------------------------------------------------------------------------- sequence sharding
def _sequence_sharding(k_BxLxKxD, k_cache_BxSxKxD):
    """The per-shard attention to use when the active mesh splits the new tokens (`seq` of `KV_AXES`) or the
    cache slots over mesh axes; None when neither is split. The new tokens split → `_gathered` (each shard
    gathers K/V); only the cache split → `_partial_softmax` (flash-decoding: no gather of the cache)."""
    mesh = current_mesh()
    if mesh is None:
        return None
    kv_spec = logical_to_spec(KV_AXES, k_BxLxKxD.shape, mesh)
    c_spec = None if k_cache_BxSxKxD is None else logical_to_spec(KV_AXES, k_cache_BxSxKxD.shape, mesh)
    q_seq, c_seq = spec_axes(kv_spec[1]), () if c_spec is None else spec_axes(c_spec[1])
    if not q_seq and not c_seq:
        return None
    if c_spec is not None and (c_spec[0], c_spec[2]) != (kv_spec[0], kv_spec[2]):
        raise ValueError(f"cache sharding {c_spec} and new K/V sharding {kv_spec} differ outside the sequence axis")
    # q [B, L, H, D] is split like k: its heads over the kv-head axes, so every shard holds whole GQA groups.
    layout = _ShardLayout(mesh, kv_spec, c_spec, q_seq, c_seq)
    return functools.partial(_gathered if q_seq else _partial_softmax, layout)


@dataclasses.dataclass(frozen=True)
class _ShardLayout:
    mesh: object
    kv_spec: P  # new q / k / v [B, L, ·, D]
    cache_spec: P | None  # cached K / V [B, S, K, D]
    q_seq: tuple[str, ...]  # mesh axes splitting the new tokens
    cache_seq: tuple[str, ...]  # mesh axes splitting the cache slots

    def row(self, spec):  # [B, L] / [B, S] arrays (valid masks)
        return P(spec[0], spec[1])


def _gather_seq(x, axes, axis=1):
    return jax.lax.all_gather(x, axes, axis=axis, tiled=True) if axes else x


def _gathered(lay: _ShardLayout, q, k, v, valid_BxL, kv_cache, cache_start, cache_valid_BxS):
    """New tokens split over `q_seq` in n shards of c: each shard gathers the new K/V (and the cache, if any)
    and attends its queries, at their global slots, to every visible slot (exact; K/V are small: K·D per token)."""
    b, l = q.shape[:2]
    c = l // axes_size(lay.mesh, lay.q_seq)
    if valid_BxL is None:
        valid_BxL = jnp.ones((b, l), bool)
    kv_spec = lay.kv_spec

    if kv_cache is None:
        def local(q, k, v, valid):
            first = jax.lax.axis_index(lay.q_seq) * c
            kf, vf, validf = (_gather_seq(x, lay.q_seq) for x in (k, v, valid))
            # every key block is visited (a static loop: differentiable, for training); causality masks the rest
            return _attend_in_query_blocks(q, kf, vf, first, validf, bound_keys=False)

        out = jax.shard_map(local, mesh=lay.mesh, in_specs=(kv_spec, kv_spec, kv_spec, lay.row(kv_spec)),
                            out_specs=kv_spec)(q, k, v, valid_BxL)
        return out, None

    c_spec = lay.cache_spec

    def local(q, k, v, kc, vc, cvalid, start):
        first = start + jax.lax.axis_index(lay.q_seq) * c
        kf, vf = _gather_seq(k, lay.q_seq), _gather_seq(v, lay.q_seq)
        kcf, vcf, cvalidf = (_gather_seq(x, lay.cache_seq) for x in (kc, vc, cvalid))
        kcf = jax.lax.dynamic_update_slice_in_dim(kcf, kf.astype(kcf.dtype), start, axis=1)
        vcf = jax.lax.dynamic_update_slice_in_dim(vcf, vf.astype(vcf.dtype), start, axis=1)
        out = _attend_in_query_blocks(q, kcf, vcf, first, cvalidf)
        if lay.cache_seq:
            sc = kc.shape[1]
            own = jax.lax.axis_index(lay.cache_seq) * sc
            kcf = jax.lax.dynamic_slice_in_dim(kcf, own, sc, axis=1)
            vcf = jax.lax.dynamic_slice_in_dim(vcf, own, sc, axis=1)
        return out, kcf, vcf

    out, kc, vc = jax.shard_map(
        local, mesh=lay.mesh,
        in_specs=(kv_spec, kv_spec, kv_spec, c_spec, c_spec, lay.row(c_spec), P()),
        out_specs=(kv_spec, c_spec, c_spec))(q, k, v, *kv_cache, cache_valid_BxS, jnp.asarray(cache_start, jnp.int32))
    return out, (kc, vc)


def _attend_in_query_blocks(q_BxCxHxD, k_BxSxKxD, v_BxSxKxD, first, kv_valid_BxS, *, bound_keys: bool = True):
    """`attend` for C queries in slots first..first+C−1, in sequential blocks of `QUERY_BLOCK` queries when C is
    a multiple of it (bounded memory at long context). With `bound_keys` each block reads only the keys up to its
    last slot (a loop of traced length: no reverse-mode gradient); without, every key block (a static loop)."""
    b, c, h, d = q_BxCxHxD.shape
    if c <= QUERY_BLOCK or c % QUERY_BLOCK:
        return attend(q_BxCxHxD, k_BxSxKxD, v_BxSxKxD, q_slot_L=first + jnp.arange(c), kv_valid_BxS=kv_valid_BxS,
                      num_slots=first + c if bound_keys else None)
    n = c // QUERY_BLOCK

    def block(j):
        q = jax.lax.dynamic_slice_in_dim(q_BxCxHxD, j * QUERY_BLOCK, QUERY_BLOCK, axis=1)
        lo = first + j * QUERY_BLOCK
        return attend(q, k_BxSxKxD, v_BxSxKxD, q_slot_L=lo + jnp.arange(QUERY_BLOCK), kv_valid_BxS=kv_valid_BxS,
                      num_slots=lo + QUERY_BLOCK if bound_keys else None)

    out_NxBxQxHxD = jax.lax.map(block, jnp.arange(n))
    return jnp.moveaxis(out_NxBxQxHxD, 0, 1).reshape(b, c, h, d)


def _partial_softmax(lay: _ShardLayout, q, k, v, valid_BxL, kv_cache, cache_start, cache_valid_BxS):
    """Cache slots split over `cache_seq` in shards of sc (the new tokens are not split: decode): each shard writes
    the new tokens that land in its slots, computes softmax statistics of all queries over its own slots, and
    the shards combine them flash-decoding style (max, then psum of rescaled sums); the cache is never gathered."""
    l = q.shape[1]
    kv_spec, c_spec = lay.kv_spec, lay.cache_spec

    def local(q, k, v, kc, vc, cvalid, start):
        sc = kc.shape[1]
        own = jax.lax.axis_index(lay.cache_seq) * sc
        # Write through a window of w slots that holds every local slot the new tokens land in.
        w = min(l, sc)
        at = jnp.clip(start - own, 0, sc - w)
        tok_W = own + at + jnp.arange(w) - start
        lands_W = (tok_W >= 0) & (tok_W < l)
        src_W = jnp.clip(tok_W, 0, l - 1)

        def write(cache, new):
            old = jax.lax.dynamic_slice_in_dim(cache, at, w, axis=1)
            upd = jnp.where(lands_W[None, :, None, None], jnp.take(new, src_W, axis=1).astype(cache.dtype), old)
            return jax.lax.dynamic_update_slice_in_dim(cache, upd, at, axis=1)

        kc, vc = write(kc, k), write(vc, v)
        m, den, acc = attend_stats(q, kc, vc, q_slot_L=start + jnp.arange(l), kv_valid_BxS=cvalid,
                                   num_slots=jnp.clip(start + l - own, 0, sc), slot_base=own)
        m_all = jax.lax.pmax(m, lay.cache_seq)
        corr = jnp.exp(m - m_all)
        den = jax.lax.psum(den * corr, lay.cache_seq)
        acc = jax.lax.psum(acc * corr[..., None], lay.cache_seq)
        return _heads_out(acc, den, q.dtype), kc, vc

    out, kc, vc = jax.shard_map(
        local, mesh=lay.mesh,
        in_specs=(kv_spec, kv_spec, kv_spec, c_spec, c_spec, lay.row(c_spec), P()),
        out_specs=(kv_spec, c_spec, c_spec))(q, k, v, *kv_cache, cache_valid_BxS, jnp.asarray(cache_start, jnp.int32))
    return out, (kc, vc)


class SoftmaxAttention(nnx.Module):
    """Softmax attention layer: weights `q_proj`, `k_proj`, `v_proj`, `o_proj` (RC names)."""

    def __init__(self, config: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
        d, h, kv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        pdt, std = config.param_dtype, config.initializer_range
        self.config = config
        self.layer_idx = layer_idx
        weights = (("q_proj", (d, h, hd), ("embed", "heads", "head_dim")),
                   ("k_proj", (d, kv, hd), ("embed", "kv_heads", "head_dim")),
                   ("v_proj", (d, kv, hd), ("embed", "kv_heads", "head_dim")),
                   ("o_proj", (h, hd, d), ("heads", "head_dim", "embed")))
        for name, shape, axes in weights:
            setattr(self, name, param(rngs, shape, axes, pdt, std=std))
        for name, shape, axes in weights:
            lora.declare(self, name, shape, axes, config, rngs)

    def __call__(self, x_BxLxD: jax.Array, *, cos_BxLxR: jax.Array, sin_BxLxR: jax.Array,
                 valid_BxL: jax.Array | None = None, kv_cache: tuple[jax.Array, jax.Array] | None = None,
                 cache_start: jax.Array | None = None, cache_valid_BxS: jax.Array | None = None,
                 cache_group: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Returns (y `[B, L, D_model]`, updated (k, v) cache or None).

        Without `kv_cache`: causal attention among the L tokens (invalid tokens masked as keys).
        With `kv_cache` = (k, v) `[B, S, K, D]`: the new k, v are written at slots `cache_start..+L`, and the
        queries attend to every valid slot up to their own; `cache_valid_BxS` must already include the new slots.
        With `cache_group` g, `kv_cache` holds the caches of every scanned layer group, `[G, B, S, K, D]`: this
        layer's is group g's; the new k, v are written there in place and the keys read from there (the
        updated stacks are returned), so no copy of the group's cache is made.
        """
        if cache_group is not None and kv_cache is not None:
            layer_shape = jax.ShapeDtypeStruct(kv_cache[0].shape[1:], kv_cache[0].dtype)
            k_shape = jax.ShapeDtypeStruct((*x_BxLxD.shape[:2], *layer_shape.shape[2:]), layer_shape.dtype)
            if _sequence_sharding(k_shape, layer_shape) is not None:  # the shard_map paths take one layer's cache
                y, new = self(x_BxLxD, cos_BxLxR=cos_BxLxR, sin_BxLxR=sin_BxLxR, valid_BxL=valid_BxL,
                              kv_cache=tuple(c[cache_group] for c in kv_cache), cache_start=cache_start,
                              cache_valid_BxS=cache_valid_BxS)
                return y, tuple(jax.lax.dynamic_update_index_in_dim(c, n, cache_group, axis=0)
                                for c, n in zip(kv_cache, new, strict=True))
        dt = DTYPE[self.config.dtype]
        x_BxLxD = x_BxLxD.astype(dt)
        l = x_BxLxD.shape[1]
        q = apply_rope(linear(x_BxLxD, lora.weight(self, "q_proj").astype(dt)), cos_BxLxR, sin_BxLxR)
        k = apply_rope(linear(x_BxLxD, lora.weight(self, "k_proj").astype(dt)), cos_BxLxR, sin_BxLxR)
        v = linear(x_BxLxD, lora.weight(self, "v_proj").astype(dt))
        one_cache = None if kv_cache is None else kv_cache[0] if cache_group is None else \
            jax.ShapeDtypeStruct(kv_cache[0].shape[1:], kv_cache[0].dtype)  # (a group's: not sharded, see above)
        sharded = _sequence_sharding(k, one_cache)
        if sharded is not None:
            out, new_cache = sharded(q, k, v, valid_BxL, kv_cache, cache_start, cache_valid_BxS)
        elif kv_cache is None:
            out = attend(q, k, v, q_slot_L=jnp.arange(l), kv_valid_BxS=valid_BxL, causal_prefix=True)
            new_cache = None
        else:
            def write(cache, new):  # at slots cache_start.. (of group cache_group)
                new = new.astype(cache.dtype)
                if cache_group is None:
                    return jax.lax.dynamic_update_slice_in_dim(cache, new, cache_start, axis=1)
                zero = jnp.zeros((), jnp.int32)
                return jax.lax.dynamic_update_slice(cache, new[None], (jnp.asarray(cache_group, jnp.int32), zero,
                                                                       jnp.asarray(cache_start, jnp.int32), zero, zero))

            k_cache, v_cache = write(kv_cache[0], k), write(kv_cache[1], v)
            out = attend(q, k_cache, v_cache, q_slot_L=cache_start + jnp.arange(l), kv_valid_BxS=cache_valid_BxS,
                         num_slots=cache_start + l, group=cache_group)
            new_cache = (k_cache, v_cache)
        y = linear(out, lora.weight(self, "o_proj").astype(dt), contract=2)
        return y, new_cache
