"""Chunk-parallel lightning-attention forward for the GPU layout: a state pass, then a fully parallel output pass.

Same function as `prefill._sequence_scan(FORWARD, ...)` (per head, λ = exp(−slope), the "inclusive" recurrence
S_t = λ S_{t−1} + k_tᵀ v_t, o_t = q_t S_t), computed in two `pallas_call`s instead of one sequential walk per
(batch, head, value tile), so that the expensive part runs in parallel over the sequence:

1. State pass, grid (V tiles, K tiles, batch·heads): each program walks the sequence in steps of C₁ tokens
   (`state_block_t`) with a fp32 [BK, BV] state in registers,

       S ← λ^m S + (diag(λ^{m−1−j}) K_step)ᵀ V_step        (m = valid tokens of the step, C₁ but the last)

   and stores the state ENTERING every chunk of Cs tokens (`state_chunk`), S_c, in the operand dtype
   ([B, NC, H·K, V]: bf16 for bf16 inputs, like the bf16 rounding of S in the sequential kernel's Q·S product),
   plus the fp32 final state.
2. Output pass, grid (V tiles, chunk groups, batch·heads), independent programs (a program walks
   `chunk_group` chunks in a loop): chunk c's Cs tokens from its entering state S = S_c, local i, j ∈ [0, Cs):

       O = (Q Kᵀ ⊙ M) V + diag(λ^{i+1}) (Q S),     M[i, j] = λ^{i−j} for j ≤ i, else 0

   computed in C × C tiles (C = `block_t`, r = Cs / C query sub-chunks; tiles above the diagonal skipped).
   Matmul operands are in the inputs' dtype (bf16 × bf16 → fp32 on tensor cores; fp32 inputs use fp32
   products at HIGHEST precision); the decay of the inter term is applied to the fp32 product.

Memory traffic per token, in units of one q row (2·D bytes in bf16): state pass 2 (k, v) + 2·D/Cs (states),
output pass 4 (q, k, v, o) + 2·D/Cs; Cs = 64 is what flash-linear-attention's `chunk_simple_gla` does, a
larger Cs stores fewer states for r(r+1)/2 instead of r intra tiles (the kernels are memory-bound).
Ragged sequences are zero-padded to a multiple of Cs (a copy of q, k, v); zero rows of k, v do not change
the state, and the last state step uses its true length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from m1jax.pallas_kernels.lightning.tiling import NT, Tiling, check_chunk_tiling, dot

F32 = jnp.float32
FP32_MAX_CHUNK_BLOCK_V = 64  # fp32 operands: the output pass's shared-memory footprint doubles


def _row_decay(c: int, slope_1x1, offset: int):
    """λ^{i+offset} for local row i, [C, 1]."""
    i_Cx1 = lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    return jnp.exp(-slope_1x1 * (i_Cx1 + offset).astype(F32))


def _tail_decay(c: int, slope_1x1, m: int):
    """λ^{m−1−j} for rows j < m, 0 for padding rows j ≥ m (m static), [C, 1]."""
    j_Cx1 = lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    exponent_Cx1 = jnp.maximum(m - 1 - j_Cx1, 0).astype(F32)
    decay_Cx1 = jnp.exp(-slope_1x1 * exponent_Cx1)
    return decay_Cx1 if m >= c else jnp.where(j_Cx1 < m, decay_Cx1, 0.0)


def _intra_mask(c: int, slope_1x1):
    """M[i, j] = λ^{i−j} for j ≤ i, else 0, [C, C]."""
    row_CxC = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col_CxC = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    diff_CxC = row_CxC - col_CxC
    return jnp.where(diff_CxC >= 0, jnp.exp(-slope_1x1 * jnp.maximum(diff_CxC, 0).astype(F32)), 0.0)


def _state_step(state_KxV, k_CxK, v_CxV, tail_Cx1, decay_1x1):
    """S' = λ^m S + (diag(λ^{m−1−j}) K)ᵀ V (fp32 state; K is rounded to the operand dtype after the decay)."""
    k_dec_KxC = (k_CxK.astype(F32) * tail_Cx1).astype(k_CxK.dtype).T
    return decay_1x1 * state_KxV + dot(k_dec_KxC, v_CxV)


def _state_kernel(slope_ref, k_ref, v_ref, s0_ref, states_ref, final_ref, *, step: int, steps_per_chunk: int,
                  seq_len: int):
    """One (batch, head, K tile, V tile): store the state entering every chunk; the last one is the final state.

    k_ref [T_pad, BK], v_ref [T_pad, BV] (operand dtype), s0_ref / final_ref [BK, BV] fp32,
    states_ref [NC, BK, BV]. Full chunks run in a `fori_loop` with constant decays; a ragged tail is unrolled
    with its static lengths.
    """
    slope_1x1 = slope_ref[...].astype(F32)
    c1, r1 = step, steps_per_chunk
    cs = c1 * r1
    full_tail_Cx1 = _tail_decay(c1, slope_1x1, c1)
    full_decay_1x1 = jnp.exp(-slope_1x1 * float(c1))

    def update(state_KxV, start, tail_Cx1, decay_1x1):
        rows = pl.ds(start, c1)
        return _state_step(state_KxV, k_ref[rows, :], v_ref[rows, :], tail_Cx1, decay_1x1)

    def body(chunk, state_KxV):
        states_ref[chunk] = state_KxV.astype(states_ref.dtype)
        for u in range(r1):
            start = pl.multiple_of(chunk * cs + u * c1, c1)
            state_KxV = update(state_KxV, start, full_tail_Cx1, full_decay_1x1)
        return state_KxV

    n_full = seq_len // cs
    state_KxV = lax.fori_loop(0, n_full, body, s0_ref[...].astype(F32))
    rem = seq_len - n_full * cs
    if rem:
        states_ref[n_full] = state_KxV.astype(states_ref.dtype)
        for u in range(pl.cdiv(rem, c1)):
            m = min(c1, rem - u * c1)
            if m == c1:
                tail_Cx1, decay_1x1 = full_tail_Cx1, full_decay_1x1
            else:
                tail_Cx1, decay_1x1 = _tail_decay(c1, slope_1x1, m), jnp.exp(-slope_1x1 * float(m))
            state_KxV = update(state_KxV, n_full * cs + u * c1, tail_Cx1, decay_1x1)
    final_ref[...] = state_KxV


def _output_chunk(slope_1x1, masks, q_ref, k_ref, v_ref, s_KxV, o_ref, start, *, c: int, r: int):
    """O of the Cs = r·C tokens at rows [start, start + Cs) of the refs, entering state S (operand dtype)."""
    cdt = q_ref.dtype
    for u in range(r):
        q_CxK = q_ref[pl.ds(start + u * c, c), :]
        o_CxV = None
        for w in range(u + 1):
            rows = pl.ds(start + w * c, c)
            scores_CxC = dot(q_CxK, k_ref[rows, :], NT) * masks[u - w]
            intra_CxV = dot(scores_CxC.astype(cdt), v_ref[rows, :])
            o_CxV = intra_CxV if o_CxV is None else o_CxV + intra_CxV
        o_CxV = o_CxV + _row_decay(c, slope_1x1, u * c + 1) * dot(q_CxK, s_KxV)
        o_ref[pl.ds(start + u * c, c), :] = o_CxV.astype(o_ref.dtype)


def _output_kernel(slope_ref, q_ref, k_ref, v_ref, s_ref, o_ref, *, block: int, sub_chunks: int, group: int):
    """One (V tile, group of G chunks, batch·head): O for G·Cs tokens, chunk g from its entering state S_g.

    q_ref, k_ref [G·Cs, K]; v_ref, o_ref [G·Cs, BV]; s_ref [G, K, BV] (stored states, operand dtype). The
    chunks are independent; G > 1 walks them in a `fori_loop` (so Triton can prefetch the next chunk's
    operands while computing one). In chunk g, query sub-chunk u (rows uC … uC+C−1), local i, j ∈ [0, C),
    d = u − w:

        O_u = diag(λ^{uC+i+1}) (Q_u S_g) + Σ_{w ≤ u} (Q_u K_wᵀ ⊙ M_d) V_w,
        M_0[i, j] = λ^{i−j} (j ≤ i, else 0),   M_d[i, j] = λ^{dC+i−j} = λ^{i+1} λ^{dC−1−j} (d ≥ 1)

    — the causal Cs × Cs block product in C × C tiles, with no state carried between sub-chunks (no fp32
    [K, BV] state in registers; S stays a matmul operand).
    """
    c, r = block, sub_chunks
    cs = c * r
    slope_1x1 = slope_ref[...].astype(F32)
    masks = [_intra_mask(c, slope_1x1)]
    if r > 1:
        head_Cx1 = _row_decay(c, slope_1x1, 1)
        j_1xC = lax.broadcasted_iota(jnp.int32, (1, c), 1)
        for d in range(1, r):  # λ^{i+1} · λ^{dC−1−j}: both exponents ≥ 0
            masks.append(head_Cx1 * jnp.exp(-slope_1x1 * (d * c - 1 - j_1xC).astype(F32)))
    chunk = functools.partial(_output_chunk, slope_1x1, masks, q_ref, k_ref, v_ref, c=c, r=r)
    if group == 1:
        chunk(s_ref[0].astype(q_ref.dtype), o_ref, 0)
        return

    def body(g, carry):
        chunk(s_ref[g].astype(q_ref.dtype), o_ref, pl.multiple_of(g * cs, cs))
        return carry

    lax.fori_loop(0, group, body, 0)


def chunk_parallel_forward(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, s0_BxHxKxV, slope_H, *, tiling: Tiling, out_dtype,
                           name: str = "lightning_forward"):
    """Forward of lightning attention with the chunk-parallel kernels; returns (out [B, T, H, V], final fp32).

    Same contract as `prefill._sequence_scan(FORWARD, ...)`: q, k `[B, T, H, K]`, v `[B, T, H, V]` (any float
    dtypes; products in their promoted dtype), s0 `[B, H, K, V]`, slope `[H]` (fp32).
    """
    check_chunk_tiling(tiling)
    b, t, h, dk = q_BxTxHxK.shape
    dv = v_BxTxHxV.shape[-1]
    s0 = s0_BxHxKxV.astype(F32)
    if t == 0:
        return jnp.zeros((b, 0, h, dv), out_dtype), s0
    cdt = jnp.promote_types(jnp.promote_types(q_BxTxHxK.dtype, k_BxTxHxK.dtype), v_BxTxHxV.dtype)
    itemsize = jnp.dtype(cdt).itemsize
    c, cs, c1 = tiling.block_t, tiling.state_chunk, tiling.state_block_t
    nc = pl.cdiv(t, cs)
    tp = nc * cs

    def stream(x):  # [B, T, H, D] → [B, T_pad, H·D] (free reshape; pads only a ragged end)
        x = x.astype(cdt)
        if tp != t:
            x = jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
        return x.reshape(b, tp, h * x.shape[-1])

    q, k, v = stream(q_BxTxHxK), stream(k_BxTxHxK), stream(v_BxTxHxV)
    slope_Hx1x1 = slope_H.astype(F32).reshape(h, 1, 1)

    # ---- pass 1: states entering every chunk, and the final state
    bk = tiling.value_tile(dk, cap=tiling.state_block_k)
    bv1 = tiling.value_tile(dv, cap=tiling.state_block_v)
    nk, nv1 = dk // bk, dv // bv1
    tokens = b * t * h
    states, final = pl.pallas_call(
        functools.partial(_state_kernel, step=c1, steps_per_chunk=cs // c1, seq_len=t),
        out_shape=(jax.ShapeDtypeStruct((b, nc, h * dk, dv), cdt), jax.ShapeDtypeStruct((b, h, dk, dv), F32)),
        grid=(nv1, nk, b * h),
        in_specs=[
            pl.BlockSpec((None, 1, 1), lambda j, i, bh: (bh % h, 0, 0)),
            pl.BlockSpec((None, tp, bk), lambda j, i, bh: (bh // h, 0, (bh % h) * nk + i)),
            pl.BlockSpec((None, tp, bv1), lambda j, i, bh: (bh // h, 0, (bh % h) * nv1 + j)),
            pl.BlockSpec((None, None, bk, bv1), lambda j, i, bh: (bh // h, bh % h, i, j)),
        ],
        out_specs=(
            pl.BlockSpec((None, nc, bk, bv1), lambda j, i, bh: (bh // h, 0, (bh % h) * nk + i, j)),
            pl.BlockSpec((None, None, bk, bv1), lambda j, i, bh: (bh // h, bh % h, i, j)),
        ),
        compiler_params=tiling.compiler_params(3, sequential_last=False, num_warps=tiling.state_num_warps,
                                               num_stages=tiling.state_num_stages),
        cost_estimate=pl.CostEstimate(
            flops=int(2 * tokens * dk * dv), transcendentals=int(b * h * nk * nv1 * (c1 + 1)),
            bytes_accessed=int(tokens * (dk * nv1 + dv * nk) * itemsize + b * nc * h * dk * dv * itemsize
                               + 2 * b * h * dk * dv * 4)),
        interpret=tiling.interpret,
        name=name + "_states",
    )(slope_Hx1x1, k, v, s0)

    # ---- pass 2: outputs, every (value tile, chunk, batch·head) independent
    cap = tiling.chunk_block_v if itemsize < 4 else min(tiling.chunk_block_v, FP32_MAX_CHUNK_BLOCK_V)
    bv = tiling.value_tile(dv, cap=cap)
    nv = dv // bv
    r = cs // c
    group = tiling.chunk_group
    while nc % group:  # the largest power of two ≤ chunk_group dividing NC (no extra padding)
        group //= 2
    gs = group * cs
    out = pl.pallas_call(
        functools.partial(_output_kernel, block=c, sub_chunks=r, group=group),
        out_shape=jax.ShapeDtypeStruct((b, tp, h * dv), out_dtype),
        grid=(nv, nc // group, b * h),
        in_specs=[
            pl.BlockSpec((None, 1, 1), lambda j, n, bh: (bh % h, 0, 0)),
            pl.BlockSpec((None, gs, dk), lambda j, n, bh: (bh // h, n, bh % h)),
            pl.BlockSpec((None, gs, dk), lambda j, n, bh: (bh // h, n, bh % h)),
            pl.BlockSpec((None, gs, bv), lambda j, n, bh: (bh // h, n, (bh % h) * nv + j)),
            pl.BlockSpec((None, group, dk, bv), lambda j, n, bh: (bh // h, n, bh % h, j)),
        ],
        out_specs=pl.BlockSpec((None, gs, bv), lambda j, n, bh: (bh // h, n, (bh % h) * nv + j)),
        compiler_params=tiling.compiler_params(3, sequential_last=False, num_warps=tiling.chunk_num_warps,
                                               num_stages=tiling.chunk_num_stages),
        cost_estimate=pl.CostEstimate(
            flops=int(2 * b * tp * h * (c * dk * nv + c * dv + dk * dv + (dk * dv if r > 1 else 0))),
            transcendentals=int(b * nc * h * nv * (c * c + 2 * c)),
            bytes_accessed=int(b * tp * h * (2 * dk * nv + dv) * itemsize + b * nc * h * dk * dv * itemsize
                               + b * tp * h * dv * jnp.dtype(out_dtype).itemsize)),
        interpret=tiling.interpret,
        name=name,
    )(slope_Hx1x1, q, k, v, states)
    out = out.reshape(b, tp, h, dv)
    return (out[:, :t] if tp != t else out), final
