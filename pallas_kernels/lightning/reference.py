"""Pure-JAX lightning attention: the O(n) blocked XLA path and the plain references the tests compare with.

Per head, with decay λ = exp(−slope) and an initial state S₀ (fp32, [D, D]), lightning attention is the
"inclusive" decayed linear-attention recurrence of MiniMax-M1 (spec §3.4):

    S_t = λ·S_{t−1} + k_tᵀ v_t,        o_t = q_t S_t,        t = 1..T
        ⇔ o_t = λ^t q_t S₀ + Σ_{j≤t} λ^{t−j} (q_t·k_j) v_j

All functions take q, k, v `[batch, seq, heads, head_dim]` (any float dtype), `slope` `[heads]` and an optional
`initial_state` `[batch, heads, head_dim, head_dim]`; they return `(out, final_state)` with `out` in q's dtype and
`final_state = S_T` in fp32. Arithmetic is fp32 throughout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


def _prepare(q, k, v, slope, initial_state):
    b, t, h, d = q.shape
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v must share [batch, seq, heads]; got {q.shape}, {k.shape}, {v.shape}")
    if slope.shape != (h,):
        raise ValueError(f"slope must have shape [heads]=({h},), got {slope.shape}")
    dv = v.shape[-1]
    if initial_state is None:
        initial_state = jnp.zeros((b, h, d, dv), F32)
    elif initial_state.shape != (b, h, d, dv):
        raise ValueError(f"initial_state must have shape {(b, h, d, dv)}, got {initial_state.shape}")
    return slope.astype(F32), initial_state.astype(F32)


def lightning_attention_naive(q, k, v, slope, initial_state=None):
    """Quadratic form: o = (Q Kᵀ ⊙ M) V + λ^{t} Q S₀ with M[t, j] = λ^{t−j} for j ≤ t (0 above the diagonal)."""
    slope, s0 = _prepare(q, k, v, slope, initial_state)
    t = q.shape[1]
    qf, kf, vf = (x.astype(F32) for x in (q, k, v))
    idx = jnp.arange(t, dtype=F32)
    diff = idx[:, None] - idx[None, :]  # t − j
    decay_HxTxT = jnp.where(diff >= 0, jnp.exp(-slope[:, None, None] * jnp.maximum(diff, 0.0)), 0.0)
    scores_BxHxTxT = jnp.einsum("bthd,bjhd->bhtj", qf, kf, precision=HIGHEST) * decay_HxTxT
    out = jnp.einsum("bhtj,bjhe->bthe", scores_BxHxTxT, vf, precision=HIGHEST)
    q_decay_TxH = jnp.exp(-slope[None, :] * (idx[:, None] + 1.0))  # λ^{t} with 1-based t
    out = out + jnp.einsum("bthd,bhde->bthe", qf * q_decay_TxH[None, :, :, None], s0, precision=HIGHEST)
    k_decay_TxH = jnp.exp(-slope[None, :] * (t - 1.0 - idx[:, None]))  # λ^{T−j}
    final = jnp.exp(-slope * t)[None, :, None, None] * s0 + jnp.einsum(
        "bjhd,bjhe->bhde", kf * k_decay_TxH[None, :, :, None], vf, precision=HIGHEST)
    return out.astype(q.dtype), final


def lightning_attention_recurrent(q, k, v, slope, initial_state=None):
    """Token-by-token recurrence S_t = λ S_{t−1} + k_tᵀ v_t, o_t = q_t S_t (a `lax.scan` over time)."""
    slope, s0 = _prepare(q, k, v, slope, initial_state)
    lam_H = jnp.exp(-slope)

    def step(state_BxHxDxD, qkv_t):
        q_t, k_t, v_t = qkv_t
        state_BxHxDxD = lam_H[None, :, None, None] * state_BxHxDxD + jnp.einsum(
            "bhd,bhe->bhde", k_t, v_t, precision=HIGHEST)
        return state_BxHxDxD, jnp.einsum("bhd,bhde->bhe", q_t, state_BxHxDxD, precision=HIGHEST)

    xs = tuple(jnp.moveaxis(x.astype(F32), 1, 0) for x in (q, k, v))
    final, out_TxBxHxD = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(out_TxBxHxD, 0, 1).astype(q.dtype), final


def lightning_decode_reference(q, k, v, slope, state):
    """One decode step for q, k, v `[batch, heads, head_dim]`: S' = λ S + kᵀ v, o = q S'. Returns (o, S')."""
    b, h, d = q.shape
    if k.shape != q.shape or v.shape[:2] != (b, h) or state.shape != (b, h, d, v.shape[-1]):
        raise ValueError(f"decode shapes mismatch: q {q.shape}, k {k.shape}, v {v.shape}, state {state.shape}")
    lam_H = jnp.exp(-slope.astype(F32))
    new_state = lam_H[None, :, None, None] * state.astype(F32) + jnp.einsum(
        "bhd,bhe->bhde", k.astype(F32), v.astype(F32), precision=HIGHEST)
    out = jnp.einsum("bhd,bhde->bhe", q.astype(F32), new_state, precision=HIGHEST)
    return out.astype(q.dtype), new_state


def lightning_attention_blocked(q, k, v, slope, initial_state=None, *, block_size: int = 256):
    """Lightning Attention-2 in blocks of C tokens: O(T·C·D + T·D²) time, fp32 state.

    With local index i, j ∈ [0, C) inside block n of length m (the last block may be ragged) and S_n the state
    entering block n:

        O_n   = (Q_n Kᵀ_n ⊙ M) V_n + diag(λ^{i+1}) Q_n S_n            (intra + inter)
        S_n+1 = λ^m S_n + (diag(λ^{m−1−j}) K_n)ᵀ V_n

    The intra products and the per-block increments run batched over all blocks; only the D×D state
    recurrence is a scan over blocks.
    """
    slope, s0 = _prepare(q, k, v, slope, initial_state)
    b, t, h, d = q.shape
    dv = v.shape[-1]
    c = int(block_size)
    if c <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    c = min(c, max(t, 1))
    n = -(-t // c)
    pad = n * c - t

    def blocks(x):  # [B, T, H, X] -> [B, H, N, C, X]: batch dims leading, so every einsum is a batched GEMM
        x = jnp.pad(x.astype(F32), ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.transpose(0, 2, 1, 3).reshape(b, h, n, c, x.shape[-1])

    qf, kf, vf = blocks(q), blocks(k), blocks(v)
    local = jnp.arange(c, dtype=F32)
    block_len_N = jnp.minimum(c, t - jnp.arange(n) * c).astype(F32)  # m per block
    diff = local[:, None] - local[None, :]
    slope_H11 = slope[:, None, None]
    intra_decay_HxCxC = jnp.where(diff >= 0, jnp.exp(-slope_H11 * jnp.maximum(diff, 0.0)), 0.0)
    q_decay_HxC = jnp.exp(-(local[None, :] + 1.0) * slope[:, None])
    k_exp_NxC = block_len_N[:, None] - 1.0 - local[None, :]
    k_decay_HxNxC = jnp.where(k_exp_NxC >= 0, jnp.exp(-jnp.maximum(k_exp_NxC, 0.0) * slope_H11), 0.0)
    block_decay_NxH = jnp.exp(-block_len_N[:, None] * slope[None, :])

    scores = jnp.einsum("bhnid,bhnjd->bhnij", qf, kf, precision=HIGHEST) * intra_decay_HxCxC[:, None]
    out_intra = jnp.einsum("bhnij,bhnje->bhnie", scores, vf, precision=HIGHEST)
    inc_BxHxNxDxE = jnp.einsum("bhnjd,bhnje->bhnde", kf * k_decay_HxNxC[..., None], vf, precision=HIGHEST)

    def step(state, xs):
        inc, decay_H = xs
        return decay_H[None, :, None, None] * state + inc, state

    final, states_in_NxBxHxDxE = jax.lax.scan(step, s0, (jnp.moveaxis(inc_BxHxNxDxE, 2, 0), block_decay_NxH))
    out_inter = jnp.einsum("bhnid,bhnde->bhnie", qf * q_decay_HxC[:, None, :, None],
                           jnp.moveaxis(states_in_NxBxHxDxE, 0, 2), precision=HIGHEST)
    out = (out_intra + out_inter).reshape(b, h, n * c, dv)[:, :, :t].transpose(0, 2, 1, 3)
    return out.astype(q.dtype), final
