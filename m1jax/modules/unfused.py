"""`dot_boundary`: keep a matrix product a library GEMM/GEMV call on CPU.

XLA:CPU fuses elementwise producers/consumers (casts, silu, sigmoid, the decode loop's selects) into a dot and
then emits the fusion as a generic loop instead of calling its GEMM/GEMV library, which for the small-M products
of decoding reads the weights at a fraction of the memory bandwidth (bench-small, batch-1 decode step:
LM head 8.9 → 4.2 ms, MoE gather 8 layers −2.4 ms). An optimization barrier around the dot's operands and result
stops that fusion. On GPU/TPU the barrier would only block useful epilogue fusion, so there it is the identity.
"""

from __future__ import annotations

import jax


def dot_boundary(x):
    """x unchanged (any pytree); on the CPU backend, a fusion boundary (`lax.optimization_barrier`)."""
    if jax.default_backend() == "cpu":
        return jax.lax.optimization_barrier(x)
    return x
