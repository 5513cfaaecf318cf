"""Pallas lightning-attention prefill: blocked forward kernel, reverse-time backward kernel, `jax.custom_vjp`.

Per (batch, head) with λ = exp(−slope), the forward pass is the recurrence S_t = λ S_{t−1} + k_tᵀ v_t,
o_t = q_t S_t (see `reference.py`). The kernels walk the sequence in blocks of C tokens (Lightning
Attention-2); inside block n with m ≤ C valid tokens, local indices i, j ∈ [0, C) and the state S entering it:

    O     = (Q Kᵀ ⊙ M) V + diag(λ^{i+1}) Q S,       M[i, j] = λ^{i−j} for j ≤ i, else 0
    S'    = λ^m S + (diag(λ^{m−1−j}) K)ᵀ V                                       (`_forward_block`)

Backward, with dO the cotangent of the outputs and dS_T that of the final state, the adjoint of the state
R_t = ∂L/∂S_t obeys R_t = λ R_{t+1} + q_tᵀ dO_t, walked from the last block to the first with the carry
G = λ R (G = dS_T before the last block). Per block:

    dV    = (K Qᵀ ⊙ Mᵀ) dO + diag(λ^{m−1−i}) K G
    G'    = λ^m G + (diag(λ^{i+1}) Q)ᵀ dO                                        (`_reverse_block`)

and after the first block G = ∂L/∂S_0. The other gradients reuse the same two kernels with roles swapped:
dK is `_reverse_block` on the transposed problem (q→dO, k→v, dO→q, G→dS_Tᵀ) since dk_t = v_t R_tᵀ, and dQ is
the forward kernel with (q, k, v, S_0) → (dO, v, k, S_0ᵀ) since dq_t = dO_t S_tᵀ.

The decay is a constant in MiniMax: `slope` gets a ZERO cotangent (differentiate through `impl="xla"` if the
decay must be learned). The cheap identity ∂L/∂log λ = Σ_t t (q_t·dq_t − k_t·dk_t) + ⟨dS_0, S_0⟩ +
(T − 1)⟨dS_T, S_T⟩ cancels catastrophically for fast-decaying heads (measured: 8e-5 relative error at T = 1000
in fp32, > 100 % in bf16), so it is deliberately not used.

Numerics: states and accumulation are fp32; matmul operands are in the inputs' (promoted) dtype — bf16 inputs
give bf16 × bf16 → fp32 products (the state and the decayed Q/K are rounded to bf16 for their products, like
RC's kv increment), fp32 inputs use fp32 products at HIGHEST precision. Ragged sequences are zero-padded to a
multiple of C; the decays of the last block use its true length m.

Forward algorithm (`tiling.py`, `Tiling.algorithm`): "sequential" is the block walk above; "chunk_parallel"
(`chunked.py`, the GPU default) computes the same function with a state pass and a parallel output pass.

Layout (`tiling.py`): C is the kernel's own block size, derived from `block_size` within what the backend can
tile (GPU: a power of two in [16, 64] by default); any C gives the same function up to fp rounding. On GPU a
long sequence may also be cut into segments that run in parallel (`_sequence_scan`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from m1jax.pallas_kernels.lightning import chunked, reference
from m1jax.pallas_kernels.lightning.tiling import NT, Tiling, choose_tiling, dot

F32 = jnp.float32


def _head_decay(c: int, slope_1x1):
    """λ^{i+1} for local index i, [C, 1]."""
    i_Cx1 = lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    return jnp.exp(-slope_1x1 * (i_Cx1 + 1).astype(F32))


def _tail_decay(c: int, slope_1x1, m_1x1):
    """λ^{m−1−i} for i < m, 0 for the padding rows i ≥ m, [C, 1]."""
    i_Cx1 = lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    exponent_Cx1 = jnp.maximum(m_1x1 - 1 - i_Cx1, 0).astype(F32)
    return jnp.where(i_Cx1 < m_1x1, jnp.exp(-slope_1x1 * exponent_Cx1), 0.0)


def _intra_mask(c: int, slope_1x1, *, upper: bool):
    """M[i, j] = λ^{i−j} for j ≤ i, else 0 (upper=True gives Mᵀ), [C, C]."""
    row_CxC = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col_CxC = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    diff_CxC = col_CxC - row_CxC if upper else row_CxC - col_CxC
    return jnp.where(diff_CxC >= 0, jnp.exp(-slope_1x1 * jnp.maximum(diff_CxC, 0).astype(F32)), 0.0)


def _forward_block(q_CxK, k_CxK, v_CxV, s_KxV, slope_1x1, m_1x1):
    """O = (Q Kᵀ ⊙ M) V + diag(λ^{i+1}) Q S;  S' = λ^m S + (diag(λ^{m−1−j}) K)ᵀ V.  Returns (O fp32, S')."""
    c, cdt = q_CxK.shape[0], q_CxK.dtype
    scores_CxC = dot(q_CxK, k_CxK, NT) * _intra_mask(c, slope_1x1, upper=False)
    inter_q_CxK = (q_CxK * _head_decay(c, slope_1x1)).astype(cdt)
    o_CxV = dot(scores_CxC.astype(cdt), v_CxV) + dot(inter_q_CxK, s_KxV.astype(cdt))
    return o_CxV, _forward_state_block(q_CxK, k_CxK, v_CxV, s_KxV, slope_1x1, m_1x1)[1]


def _forward_state_block(q_CxK, k_CxK, v_CxV, s_KxV, slope_1x1, m_1x1):
    """State only: S' = λ^m S + (diag(λ^{m−1−j}) K)ᵀ V.  Returns (None, S')."""
    del q_CxK
    c, cdt = k_CxK.shape[0], k_CxK.dtype
    decay_1x1 = jnp.exp(-slope_1x1 * m_1x1.astype(F32))
    tail_k_KxC = (k_CxK * _tail_decay(c, slope_1x1, m_1x1)).astype(cdt).T
    return None, decay_1x1 * s_KxV + dot(tail_k_KxC, v_CxV)


def _reverse_block(q_CxK, k_CxK, do_CxV, g_KxV, slope_1x1, m_1x1):
    """dV = (K Qᵀ ⊙ Mᵀ) dO + diag(λ^{m−1−i}) K G;  G' = λ^m G + (diag(λ^{i+1}) Q)ᵀ dO.  Returns (dV fp32, G')."""
    c, cdt = q_CxK.shape[0], q_CxK.dtype
    scores_CxC = dot(k_CxK, q_CxK, NT) * _intra_mask(c, slope_1x1, upper=True)
    tail_k_CxK = (k_CxK * _tail_decay(c, slope_1x1, m_1x1)).astype(cdt)
    dv_CxV = dot(scores_CxC.astype(cdt), do_CxV) + dot(tail_k_CxK, g_KxV.astype(cdt))
    return dv_CxV, _reverse_state_block(q_CxK, k_CxK, do_CxV, g_KxV, slope_1x1, m_1x1)[1]


def _reverse_state_block(q_CxK, k_CxK, do_CxV, g_KxV, slope_1x1, m_1x1):
    """Carry only: G' = λ^m G + (diag(λ^{i+1}) Q)ᵀ dO.  Returns (None, G')."""
    del k_CxK
    c, cdt = q_CxK.shape[0], q_CxK.dtype
    decay_1x1 = jnp.exp(-slope_1x1 * m_1x1.astype(F32))
    head_q_KxC = (q_CxK * _head_decay(c, slope_1x1)).astype(cdt).T
    return None, decay_1x1 * g_KxV + dot(head_q_KxC, do_CxV)


# (block with outputs, state-only block) per direction; the state-only one serves the segment pre-pass.
FORWARD = (_forward_block, _forward_state_block)
REVERSE = (_reverse_block, _reverse_state_block)


def _valid_len(len_ref, n, c):
    """Valid tokens m ∈ [0, C] of block n for this row, as a (1, 1) int32 array."""
    return jnp.clip(len_ref[...] - n * c, 0, c)


def _loop_kernel(len_ref, slope_ref, x1_ref, x2_ref, y_ref, s0_ref, *out_refs, block_fn, c, n_blocks, reverse):
    """GPU layout: one program per (row, head, value tile) walks all sequence blocks, state in registers."""
    *out_ref, sn_ref = out_refs
    slope_1x1 = slope_ref[...]

    def body(it, state_KxV):
        n = n_blocks - 1 - it if reverse else it
        rows = pl.ds(pl.multiple_of(n * c, c), c)
        o_CxV, state_KxV = block_fn(x1_ref[rows, :], x2_ref[rows, :], y_ref[rows, :], state_KxV, slope_1x1,
                                    _valid_len(len_ref, n, c))
        if out_ref:
            out_ref[0][rows, :] = o_CxV.astype(out_ref[0].dtype)
        return state_KxV

    sn_ref[...] = lax.fori_loop(0, n_blocks, body, s0_ref[...])


def _grid_kernel(len_ref, slope_ref, x1_ref, x2_ref, y_ref, s0_ref, *refs, block_fn, c, n_blocks, reverse):
    """TPU layout: the last grid axis walks the sequence blocks in order; the state lives in VMEM scratch."""
    *out_ref, sn_ref, state_ref = refs
    step = pl.program_id(3)
    n = n_blocks - 1 - step if reverse else step

    @pl.when(step == 0)
    def _():
        state_ref[...] = s0_ref[...]

    o_CxV, state_KxV = block_fn(x1_ref[...], x2_ref[...], y_ref[...], state_ref[...], slope_ref[...],
                                _valid_len(len_ref, n, c))
    if out_ref:
        out_ref[0][...] = o_CxV.astype(out_ref[0].dtype)
    state_ref[...] = state_KxV

    @pl.when(step == n_blocks - 1)
    def _():
        sn_ref[...] = state_KxV


def _scan_call(block_fn, x1_RxTxHK, x2_RxTxHK, y_RxTxHV, s0_RxHxKxV, slope_H, len_R, *, heads: int, reverse: bool,
               out_dtype, tiling: Tiling, name: str):
    """One pallas_call: `block_fn` over all sequence blocks of every (row, head, value tile).

    Streams are `[rows, T_pad, heads·dim]` in the matmul operand dtype with T_pad a multiple of C; row r has
    `len_R[r]` valid tokens (zero padding after them). `out_dtype=None` runs a state-only block and returns
    (None, state). Returns (out `[rows, T_pad, heads·V]`, final state `[rows, heads, K, V]` fp32).
    """
    r, tp, _ = x1_RxTxHK.shape
    h = heads
    dk, dv = x1_RxTxHK.shape[-1] // h, y_RxTxHV.shape[-1] // h
    c = tiling.block_t
    n_blocks = tp // c
    bv = tiling.value_tile(dv)
    nv = dv // bv
    kernel_kw = dict(block_fn=block_fn, c=c, n_blocks=n_blocks, reverse=reverse)

    if tiling.seq_in_grid:
        grid = (r, h, nv, n_blocks)

        def blk(n):
            return n_blocks - 1 - n if reverse else n

        row_spec = pl.BlockSpec((None, 1, 1), lambda ri, hi, j, n: (ri, 0, 0))
        slope_spec = pl.BlockSpec((None, 1, 1), lambda ri, hi, j, n: (hi, 0, 0))
        x_spec = pl.BlockSpec((None, c, dk), lambda ri, hi, j, n: (ri, blk(n), hi))
        y_spec = pl.BlockSpec((None, c, bv), lambda ri, hi, j, n: (ri, blk(n), hi * nv + j))
        s_spec = pl.BlockSpec((None, None, dk, bv), lambda ri, hi, j, n: (ri, hi, 0, j))
        kernel = functools.partial(_grid_kernel, **kernel_kw)
        scratch = [pltpu.VMEM((dk, bv), F32)]
    else:
        grid = (r, h, nv)
        row_spec = pl.BlockSpec((None, 1, 1), lambda ri, hi, j: (ri, 0, 0))
        slope_spec = pl.BlockSpec((None, 1, 1), lambda ri, hi, j: (hi, 0, 0))
        x_spec = pl.BlockSpec((None, tp, dk), lambda ri, hi, j: (ri, 0, hi))
        y_spec = pl.BlockSpec((None, tp, bv), lambda ri, hi, j: (ri, 0, hi * nv + j))
        s_spec = pl.BlockSpec((None, None, dk, bv), lambda ri, hi, j: (ri, hi, 0, j))
        kernel = functools.partial(_loop_kernel, **kernel_kw)
        scratch = []

    with_out = out_dtype is not None
    out_shape = [jax.ShapeDtypeStruct(y_RxTxHV.shape, out_dtype)] if with_out else []
    out_shape.append(jax.ShapeDtypeStruct((r, h, dk, dv), F32))
    itemsize = x1_RxTxHK.dtype.itemsize
    tokens = r * tp * h
    flops = 2 * tokens * dk * dv + (2 * tokens * (c * dk * nv + c * dv + dk * dv) if with_out else 0)
    bytes_accessed = tokens * (2 * dk * nv + dv) * itemsize + 2 * r * h * dk * dv * 4
    if with_out:
        bytes_accessed += tokens * dv * jnp.dtype(out_dtype).itemsize
    results = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=grid,
        in_specs=[row_spec, slope_spec, x_spec, x_spec, y_spec, s_spec],
        out_specs=tuple([y_spec] * with_out + [s_spec]),
        scratch_shapes=scratch,
        compiler_params=tiling.compiler_params(len(grid), sequential_last=tiling.seq_in_grid),
        cost_estimate=pl.CostEstimate(flops=int(flops), transcendentals=int(tokens * nv * (c + 2)),
                                      bytes_accessed=int(bytes_accessed)),
        interpret=tiling.interpret,
        name=name,
    )(len_R.astype(jnp.int32).reshape(r, 1, 1), slope_H.astype(F32).reshape(h, 1, 1), x1_RxTxHK, x2_RxTxHK,
      y_RxTxHV, s0_RxHxKxV.astype(F32))
    return (results[0] if with_out else None), results[-1]


def _sequence_scan(blocks, x1_BxTxHxK, x2_BxTxHxK, y_BxTxHxV, s0_BxHxKxV, slope_H, *, reverse: bool, out_dtype,
                   tiling: Tiling, name: str):
    """Run a block pair (`FORWARD` or `REVERSE`) over the whole sequence; returns (out [B,T,H,V], state fp32).

    With `tiling.num_segments = P > 1` the sequence is cut into P segments of L tokens that run as extra
    rows of the grid (more programs for small batch·heads): a state-only pre-pass gives each segment's
    increment Δ_p (zero entering state), a short XLA scan gives the entering states
    S_{p+1} = λ^{len_p} S_p + Δ_p (walked right-to-left for the reverse direction), then the main pass runs
    all segments from their entering states. The math is unchanged (states are linear in the entering state).
    """
    block_fn, state_fn = blocks
    b, t, h, dk = x1_BxTxHxK.shape
    dv = y_BxTxHxV.shape[-1]
    c = tiling.block_t
    cdt = jnp.promote_types(jnp.promote_types(x1_BxTxHxK.dtype, x2_BxTxHxK.dtype), y_BxTxHxV.dtype)
    n_blocks = max(pl.cdiv(t, c), 1)
    p = max(1, min(tiling.num_segments, n_blocks))
    seg = pl.cdiv(n_blocks, p) * c          # L, tokens per segment
    p = pl.cdiv(max(t, 1), seg)             # drop empty segments
    tp = p * seg

    def stream(x):  # [B, T, H, D] → [B·P, L, H·D] (free reshapes; pads only a ragged end)
        x = x.astype(cdt)
        if tp != t:
            x = jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
        return x.reshape(b * p, seg, h * x.shape[-1])

    x1, x2, y = stream(x1_BxTxHxK), stream(x2_BxTxHxK), stream(y_BxTxHxV)
    len_P = jnp.clip(t - jnp.arange(p) * seg, 0, seg)
    len_R = jnp.tile(len_P, b)
    call = functools.partial(_scan_call, heads=h, reverse=reverse, tiling=tiling)
    s0_BxHxKxV = s0_BxHxKxV.astype(F32)
    if p == 1:
        entering_R = s0_BxHxKxV
    else:
        zeros_R = jnp.zeros((b * p, h, dk, dv), F32)
        _, delta_R = call(state_fn, x1, x2, y, zeros_R, slope_H, len_R, out_dtype=None, name=name + "_segments")
        delta_PxB = jnp.swapaxes(delta_R.reshape(b, p, h, dk, dv), 0, 1)
        decay_PxH = jnp.exp(-slope_H.astype(F32)[None, :] * len_P[:, None].astype(F32))

        def combine(state, xs):
            delta, decay_H = xs
            return decay_H[None, :, None, None] * state + delta, state

        _, entering_PxB = lax.scan(combine, s0_BxHxKxV, (delta_PxB, decay_PxH), reverse=reverse)
        entering_R = jnp.swapaxes(entering_PxB, 0, 1).reshape(b * p, h, dk, dv)
    out_R, state_R = call(block_fn, x1, x2, y, entering_R, slope_H, len_R, out_dtype=out_dtype, name=name)
    out = out_R.reshape(b, tp, h, dv)[:, :t]
    state_BxP = state_R.reshape(b, p, h, dk, dv)
    return out, (state_BxP[:, 0] if reverse else state_BxP[:, -1])


def _transpose_state(s_BxHxKxV):
    return jnp.swapaxes(s_BxHxKxV, -1, -2)


def _forward(q, k, v, s0, slope, *, out_dtype, tiling: Tiling, name: str):
    """The forward recurrence with the algorithm `tiling.algorithm` picks; returns (out, final state fp32)."""
    if tiling.algorithm == "chunk_parallel":
        return chunked.chunk_parallel_forward(q, k, v, s0, slope, tiling=tiling, out_dtype=out_dtype, name=name)
    return _sequence_scan(FORWARD, q, k, v, s0, slope, reverse=False, out_dtype=out_dtype, tiling=tiling, name=name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _lightning(q, k, v, slope, s0, tiling):
    return _forward(q, k, v, s0, slope, out_dtype=q.dtype, tiling=tiling, name="lightning_forward")


def _lightning_vjp_fwd(q, k, v, slope, s0, tiling):
    return _lightning(q, k, v, slope, s0, tiling), (q, k, v, slope, s0)


def _lightning_vjp_bwd(tiling, res, cotangents):
    """dq = fwd(dO, v, k; S_0ᵀ);  dv, dS_0 = rev(q, k, dO; dS_T);  dk = rev(dO, v, q; dS_Tᵀ);  dslope = 0.

    dq runs the forward algorithm of `tiling` (chunk_parallel or sequential); dv, dk the sequential reverse scan.
    """
    q, k, v, slope, s0 = res
    do, dfinal = cotangents
    do = do.astype(q.dtype)
    dfinal = dfinal.astype(F32)
    scan = functools.partial(_sequence_scan, slope_H=slope, tiling=tiling)
    dq, _ = _forward(do, v, k, _transpose_state(s0), slope, out_dtype=q.dtype, tiling=tiling,
                     name="lightning_backward_dq")
    dv, ds0 = scan(REVERSE, q, k, do, dfinal, reverse=True, out_dtype=v.dtype, name="lightning_backward_dv")
    dk, _ = scan(REVERSE, do, v, q, _transpose_state(dfinal), reverse=True, out_dtype=k.dtype,
                 name="lightning_backward_dk")
    return dq, dk, dv, jnp.zeros_like(slope), ds0.astype(s0.dtype)


_lightning.defvjp(_lightning_vjp_fwd, _lightning_vjp_bwd)


@functools.partial(jax.jit, static_argnames=("block_size", "interpret", "tiling"))
def lightning_attention_pallas(q, k, v, slope, initial_state=None, *, block_size: int = 256, interpret=None,
                               tiling: Tiling | None = None):
    """Lightning attention with Pallas kernels (forward and `custom_vjp` backward); same contract as the reference.

    q, k, v `[batch, seq, heads, head_dim]`; slope `[heads]`; initial_state `[batch, heads, head_dim, v_dim]`
    or None (zeros). Returns (out in q.dtype, final_state fp32). Differentiable in q, k, v and initial_state;
    slope gets a zero cotangent. `tiling` overrides `choose_tiling(...)` (block sizes, layout, interpret mode).
    """
    slope_f32, s0 = reference._prepare(q, k, v, slope, initial_state)
    if tiling is None:
        b, t, h, d = q.shape
        tiling = choose_tiling(t, d, v.shape[-1], batch=b, heads=h, block_size=block_size, interpret=interpret)
    out, final = _lightning(q, k, v, slope_f32, s0, tiling)
    return out, final
