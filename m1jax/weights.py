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


def quantized_param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], *, std: float = 0.02
                    ) -> tuple[nnx.Param, nnx.Param]:
    """An int8 weight `[..., K, N]` and its fp32 per-output-channel scales `[..., N]` (axes without K's), as
    `m1jax.quantize.quantize_int8` makes them from an N(0, std²) init."""
    from m1jax.quantize import quantize_int8

    shape = tuple(int(s) for s in shape)
    if len(axes) != len(shape) or len(shape) < 2:
        raise ValueError(f"axes {tuple(axes)} do not match shape {shape} (a quantized weight is at least 2-d)")
    q, s = quantize_int8(std * jax.random.normal(rngs.params(), shape, jnp.float32))
    return (nnx.Param(q, logical_axes=tuple(axes)),
            nnx.Param(s, logical_axes=(*tuple(axes)[:-2], tuple(axes)[-1])))
