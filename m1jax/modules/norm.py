"""RMSNorm as MiniMax computes it (Llama style: the weight is applied after casting back)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """y = w · (x / sqrt(mean(x², −1) + eps)), the normalisation in fp32, result in x.dtype."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return (weight.astype(x.dtype) * normed.astype(x.dtype)).astype(x.dtype)
