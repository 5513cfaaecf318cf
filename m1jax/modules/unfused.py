"""Matrix products shaped for XLA:CPU's decode regime: `dot_boundary` and `linear`.

XLA:CPU fuses elementwise producers/consumers (casts, silu, sigmoid, the decode loop's selects) into a dot and
then emits the fusion as a generic loop instead of calling its GEMM/GEMV library, which for the small-M products
of decoding reads the weights at a fraction of the memory bandwidth (bench-small, batch-1 decode step:
LM head 8.9 → 4.2 ms, MoE gather 8 layers −2.4 ms). An optimization barrier around the dot's operands and result
stops that fusion. XLA:CPU also runs a single-row product x·W on one thread; split along the contraction into a
batch of two half-products it runs faster on the 2-core VM (bench-small batch-1 engine step 15.8 → 12.3 ms,
`benchmarks/RESULTS.md`). On GPU/TPU none of this applies: the barrier is the identity and `linear` one dot.

`XLA_CPU_COMPILER_OPTIONS` are the compiler options of the engine's jitted prefill and decode programs:
XLA:CPU (jax 0.10) hands every dot with more than one row to a YNNPACK fusion, which ran the MoE's expert
tiles (tens to hundreds of rows) several times slower than the Eigen GEMMs XLA:CPU calls with that fusion
off on a loaded (shared) machine, and equally fast on an idle one (measurements in
`benchmarks/RESULTS.md`). The options name an XLA:CPU debug option only, which the other backends' compilers
ignore. Jit a model call yourself with
`jax.jit(f, compiler_options=XLA_CPU_COMPILER_OPTIONS)` to get the same, or set
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=` before JAX starts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

XLA_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # no YNNPACK dot fusion: Eigen GEMMs
SPLIT_ROWS_MAX = 2  # products with at most this many rows are split along K on CPU
K_SPLIT = 2


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def dot_boundary(x):
    """x unchanged (any pytree); on the CPU backend, a fusion boundary (`lax.optimization_barrier`)."""
    if _on_cpu():
        return jax.lax.optimization_barrier(x)
    return x


def linear(x: jax.Array, w: jax.Array, contract: int = 1, *, precision=None) -> jax.Array:
    """y[..., n…] = Σ_k x[..., k…] · w[k…, n…]: contracts the last `contract` axes of x with the first of w.

    On CPU, a product of ≤ `SPLIT_ROWS_MAX` rows is computed as Σ_s x_s·W_s over the K halves (W viewed as
    [2, K/2, N], no copy) by one batched dot behind fusion boundaries; the sum order differs from x·W by
    float rounding only.
    """
    lead, kdims, ndims = x.shape[:x.ndim - contract], w.shape[:contract], w.shape[contract:]
    if x.shape[x.ndim - contract:] != kdims:
        raise ValueError(f"linear: contracting shapes differ: x {x.shape}, w {w.shape}, contract={contract}")
    m, k, n = math.prod(lead), math.prod(kdims), math.prod(ndims)
    x_MxK, w_KxN = x.reshape(m, k), w.reshape(k, n)
    if _on_cpu() and m <= SPLIT_ROWS_MAX and k % K_SPLIT == 0:
        s = K_SPLIT
        x_SxMxK = jax.lax.optimization_barrier(x_MxK.reshape(m, s, k // s).transpose(1, 0, 2))
        y_SxMxN = jax.lax.optimization_barrier(
            jnp.einsum("smk,skn->smn", x_SxMxK, w_KxN.reshape(s, k // s, n), precision=precision))
        y_MxN = y_SxMxN[0]
        for i in range(1, s):  # elementwise adds: XLA:CPU's reduce over the split axis is slower
            y_MxN = y_MxN + y_SxMxN[i]
    else:
        y_MxN = jnp.matmul(x_MxK, w_KxN, precision=precision)
    return y_MxN.reshape(*lead, *ndims)
