"""Pallas lightning-attention decode: one token per sequence, the fp32 state updated in place.

Per (batch, head) with λ = exp(−slope) and the state S [D, Dv]:

    S' = λ S + k_tᵀ v_t,        o_t = q_t S'

A memory-bound op (every step reads and writes the whole state, 2·4·D·Dv bytes per head, for ~4·D·Dv
flops), so the kernel is elementwise fp32 work on a (D, BV) state tile per program — no matmul, which Triton
could not do for a single row anyway — and the state is aliased input → output (`input_output_aliases`):
under a jit that donates the state buffer the update happens in place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from m1jax.pallas_kernels.lightning.tiling import Tiling, choose_tiling

F32 = jnp.float32


def _decode_kernel(decay_ref, q_ref, k_ref, v_ref, s_ref, o_ref, s_out_ref):
    """S' = λ S + k ⊗ v on a (D, BV) tile; o = Σ_d q_d S'[d, :]. q, k arrive as (D, 1) columns, v as a (1, BV) row."""
    s_DxV = decay_ref[...] * s_ref[...] + k_ref[...].astype(F32) * v_ref[...].astype(F32)
    s_out_ref[...] = s_DxV
    o_ref[...] = jnp.sum(q_ref[...].astype(F32) * s_DxV, axis=0, keepdims=True).astype(o_ref.dtype)


def _decode_call(q_BxHxD, k_BxHxD, v_BxHxV, decay_H, state_BxHxDxV, tiling: Tiling):
    b, h, d = q_BxHxD.shape
    dv = v_BxHxV.shape[-1]
    bv = tiling.value_tile(dv, decode=True)
    nv = dv // bv
    col = pl.BlockSpec((None, None, d, 1), lambda bi, hi, j: (bi, hi, 0, 0))
    row = pl.BlockSpec((None, None, 1, bv), lambda bi, hi, j: (bi, hi, 0, j))
    tile = pl.BlockSpec((None, None, d, bv), lambda bi, hi, j: (bi, hi, 0, j))
    decay = pl.BlockSpec((None, 1, 1), lambda bi, hi, j: (hi, 0, 0))
    out, new_state = pl.pallas_call(
        _decode_kernel,
        out_shape=(jax.ShapeDtypeStruct((b, h, 1, dv), q_BxHxD.dtype),
                   jax.ShapeDtypeStruct(state_BxHxDxV.shape, F32)),
        grid=(b, h, nv),
        in_specs=[decay, col, col, row, tile],
        out_specs=(row, tile),
        input_output_aliases={4: 1},
        compiler_params=tiling.compiler_params(3, sequential_last=False),
        cost_estimate=pl.CostEstimate(flops=5 * b * h * d * dv, transcendentals=0,
                                      bytes_accessed=8 * b * h * d * dv + 4 * b * h * (2 * d + 2 * dv)),
        interpret=tiling.interpret,
        name="lightning_decode",
    )(decay_H.reshape(h, 1, 1), q_BxHxD.reshape(b, h, d, 1), k_BxHxD.reshape(b, h, d, 1),
      v_BxHxV.reshape(b, h, 1, dv), state_BxHxDxV)
    return out.reshape(b, h, dv), new_state


@functools.partial(jax.jit, static_argnames=("interpret", "tiling"))
def lightning_decode_pallas(q, k, v, slope, state, *, interpret=None, tiling: Tiling | None = None):
    """One decode step for q, k, v `[batch, heads, head_dim]` and state `[batch, heads, head_dim, v_dim]`.

    Returns (o `[batch, heads, v_dim]` in q.dtype, new state fp32); same contract as
    `reference.lightning_decode_reference`. Not differentiable (decode is inference only).
    """
    b, h, d = q.shape
    if k.shape != q.shape or v.shape[:2] != (b, h) or state.shape != (b, h, d, v.shape[-1]):
        raise ValueError(f"decode shapes mismatch: q {q.shape}, k {k.shape}, v {v.shape}, state {state.shape}")
    if tiling is None:
        tiling = choose_tiling(1, d, v.shape[-1], interpret=interpret)
    decay_H = jnp.exp(-slope.astype(F32))
    return _decode_call(q, k, v, decay_H, state.astype(F32), tiling)
