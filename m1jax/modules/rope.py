"""Rotary position embedding on the first `rope_dim` dims of each head (NeoX rotate-half, RC semantics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_tables(positions_BxL: jax.Array, rope_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[B, L, rope_dim]` fp32 of angle pos·θ^(−2i/rope_dim), each frequency repeated for both halves."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rope_dim, 2, dtype=jnp.float32) / rope_dim))
    freqs_BxLxR2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs_BxLxR2, freqs_BxLxR2], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxLxHxD: jax.Array, cos_BxLxR: jax.Array, sin_BxLxR: jax.Array) -> jax.Array:
    """x_r·cos + rotate_half(x_r)·sin on the first R dims (rotate_half(a, b) = (−b, a)); other dims unchanged."""
    r = cos_BxLxR.shape[-1]
    xr = x_BxLxHxD[..., :r].astype(jnp.float32)
    x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = xr * cos_BxLxR[:, :, None, :] + rotated * sin_BxLxR[:, :, None, :]
    return jnp.concatenate([out.astype(x_BxLxHxD.dtype), x_BxLxHxD[..., r:]], axis=-1)
