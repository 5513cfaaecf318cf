"""Weight declaration: each parameter is declared once with its shape, dtype, logical axes and initializer."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

DTYPE = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], dtype, *, init: str = "normal",
          std: float = 0.02) -> nnx.Param:
    """An `nnx.Param` of `shape` with `logical_axes` metadata; init "normal" (N(0, std²)), "ones" or "zeros"."""
    shape = tuple(int(s) for s in shape)
    if len(axes) != len(shape):
        raise ValueError(f"axes {tuple(axes)} do not match shape {shape}")
    dtype = DTYPE.get(dtype, dtype)
    if init == "normal":
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value, logical_axes=tuple(axes))
