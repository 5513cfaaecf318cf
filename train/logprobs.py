"""Per-token log-probabilities of given sequences under the trainer's forward pass — the one function used for
π_old (recomputed with the rollout parameters) and for π_θ inside the loss — and sampler/trainer agreement.

For tokens x_0..x_{L-1} (left-padded prompt, response, right padding):

    logp_t = log softmax(h_{t-1} · W_lm)[x_t]      for t ≥ 1,   logp_0 = 0
    H_t    = −Σ_v p_t(v) log p_t(v)                 (token entropy of the predictive distribution at t)

with the LM head and the log-softmax in fp32 whatever the compute dtype (MiniMax-M1 §3.2: an fp16/bf16 head
drops the sampler/trainer probability correlation from 0.997 to 0.987 and stalls the reward).

Chunked (`seq_chunk`, `vocab_chunk`), the fp32 logits are never materialised for the whole sequence: positions are
taken in chunks of `seq_chunk` per row (strided, t ≡ j mod n for chunk j of n, so every chunk is split over the
mesh like the sequence), each chunk under `jax.checkpoint` (its logits are recomputed in the backward pass); with
`vocab_chunk`, the head's columns are visited in strided chunks too, accumulating online

    m = max_v l_v,   s = Σ_v e^{l_v − m},   u = Σ_v e^{l_v − m} l_v,   log Z = m + log s,   H = log Z − u / s,

so only `[B, seq_chunk, vocab_chunk]` fp32 logits are live. Values and gradients equal the unchunked ones (up to
fp32 summation order when the vocabulary is chunked).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class TokenLogprobs:
    """logp_BxL (fp32, position t = log-prob of token t, 0 at t = 0); entropy_BxL (or None); aux_loss: the
    summed per-layer MoE load-balancing loss (or None)."""

    logp_BxL: jax.Array
    entropy_BxL: jax.Array | None = None
    aux_loss: jax.Array | None = None


def positions_from_valid(valid_BxL: jax.Array) -> jax.Array:
    """RoPE positions of a left-padded batch: 0, 1, … from each row's first real token (padding gets 0), the
    numbering the generation engine uses."""
    return jnp.maximum(jnp.cumsum(valid_BxL.astype(jnp.int32), axis=1) - 1, 0)


def sequence_logprobs(model, tokens_BxL: jax.Array, *, valid_BxL: jax.Array | None = None,
                      positions_BxL: jax.Array | None = None, with_entropy: bool = False,
                      with_aux_loss: bool = False, seq_chunk: int | None = None,
                      vocab_chunk: int | None = None, routed_experts_BxLxNxK: jax.Array | None = None
                      ) -> TokenLogprobs:
    """log π(x_t | x_<t) for every position of `tokens_BxL` (see the module docstring), fp32 head and softmax.

    valid_BxL: False on padding (never attended to); positions_BxL default to `positions_from_valid(valid)`;
    seq_chunk / vocab_chunk: see `head_logprobs`; routed_experts_BxLxNxK: routing replay (the experts the
    rollout engine routed each token to, per layer; see `MiniMaxM1.__call__`), None = the model's own routing.
    """
    b, l = tokens_BxL.shape
    if valid_BxL is None:
        valid_BxL = jnp.ones((b, l), bool)
    if positions_BxL is None:
        positions_BxL = positions_from_valid(valid_BxL)
    out = model(tokens_BxL, positions_BxL=positions_BxL, valid_BxL=valid_BxL, logits="none",
                return_routing=with_aux_loss, routed_experts=routed_experts_BxLxNxK)
    # position t-1 predicts token t
    logp_BxT, entropy_BxT = head_logprobs(model, out.hidden[:, :-1], tokens_BxL[:, 1:], with_entropy=with_entropy,
                                          seq_chunk=seq_chunk, vocab_chunk=vocab_chunk)
    logp_BxL = jnp.pad(logp_BxT, ((0, 0), (1, 0)))
    entropy_BxL = None if entropy_BxT is None else jnp.pad(entropy_BxT, ((0, 0), (1, 0)))
    aux = None
    if with_aux_loss:
        aux = sum(jnp.asarray(stats["aux_loss"], jnp.float32) for stats in out.routing)
    return TokenLogprobs(logp_BxL=logp_BxL, entropy_BxL=entropy_BxL, aux_loss=aux)


def _check_chunk(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive number of positions/columns or None, got {value!r}")


def head_logprobs(model, h_BxTxD: jax.Array, targets_BxT: jax.Array, *, with_entropy: bool = False,
                  seq_chunk: int | None = None, vocab_chunk: int | None = None
                  ) -> tuple[jax.Array, jax.Array | None]:
    """(logp_BxT, entropy_BxT or None) of the fp32 head at hidden states h: logp_t = log softmax(h_t·W)[target_t],
    H_t = −Σ_v p_t(v) log p_t(v). `seq_chunk`: positions per row per chunk (None: all at once); `vocab_chunk`:
    head columns per chunk (None: all), see the module docstring."""
    _check_chunk("seq_chunk", seq_chunk)
    _check_chunk("vocab_chunk", vocab_chunk)
    targets_BxT = targets_BxT.astype(jnp.int32)
    head = functools.partial(_head_stats, model, with_entropy=with_entropy, vocab_chunk=vocab_chunk)
    b, t, d = h_BxTxD.shape
    if seq_chunk is None or seq_chunk >= t:
        return head(h_BxTxD, targets_BxT)
    n = -(-t // seq_chunk)  # chunks; chunk j holds positions j, j + n, j + 2n, …
    pad = n * seq_chunk - t
    h_NxBxCxD = jnp.moveaxis(jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0))).reshape(b, seq_chunk, n, d), 2, 0)
    tgt_NxBxC = jnp.moveaxis(jnp.pad(targets_BxT, ((0, 0), (0, pad))).reshape(b, seq_chunk, n), 2, 0)

    def body(_, xs):
        return None, head(*xs)

    _, (logp_NxBxC, ent_NxBxC) = jax.lax.scan(jax.checkpoint(body), None, (h_NxBxCxD, tgt_NxBxC))

    def unchunk(x_NxBxC):
        return jnp.moveaxis(x_NxBxC, 0, 2).reshape(b, n * seq_chunk)[:, :t]

    return unchunk(logp_NxBxC), None if ent_NxBxC is None else unchunk(ent_NxBxC)


def _head_stats(model, h_BxCxD, tgt_BxC, *, with_entropy: bool, vocab_chunk: int | None):
    """(logp_BxC, entropy_BxC or None) of one chunk of positions, over the whole vocabulary or in strided
    `vocab_chunk`-column chunks with the online accumulation of the module docstring."""
    if vocab_chunk is None or vocab_chunk >= model.config.vocab_size:
        logz_BxCxV = jax.nn.log_softmax(model.lm_head_logits(h_BxCxD), axis=-1)
        logp_BxC = jnp.take_along_axis(logz_BxCxV, tgt_BxC[..., None], axis=-1)[..., 0]
        if not with_entropy:
            return logp_BxC, None
        return logp_BxC, -jnp.sum(jnp.exp(logz_BxCxV) * logz_BxCxV, axis=-1)
    w_DxV = model.lm_head[...]
    d, v = w_DxV.shape
    n = -(-v // vocab_chunk)  # chunk j holds columns j, j + n, …
    w_DxKxN = jnp.pad(w_DxV, ((0, 0), (0, n * vocab_chunk - v))).reshape(d, vocab_chunk, n)
    b, c = tgt_BxC.shape

    def body(carry, j):
        m_BxC, s_BxC, u_BxC, picked_BxC = carry
        ids_K = jnp.arange(vocab_chunk) * n + j
        l_BxCxK = model.lm_head_logits(h_BxCxD, jax.lax.dynamic_index_in_dim(w_DxKxN, j, axis=2, keepdims=False))
        real_K = ids_K < v
        l_BxCxK = jnp.where(real_K, l_BxCxK, 0.0)  # padding columns: e = 0 below, and no inf · 0 in the gradient
        m_new = jnp.maximum(m_BxC, jnp.max(jnp.where(real_K, l_BxCxK, -jnp.inf), axis=-1))
        e_BxCxK = jnp.where(real_K, jnp.exp(l_BxCxK - m_new[..., None]), 0.0)
        scale = jnp.exp(m_BxC - m_new)
        s_BxC = s_BxC * scale + jnp.sum(e_BxCxK, axis=-1)
        u_BxC = u_BxC * scale + jnp.sum(e_BxCxK * l_BxCxK, axis=-1)
        picked_BxC = picked_BxC + jnp.sum(jnp.where(ids_K == tgt_BxC[..., None], l_BxCxK, 0.0), axis=-1)
        return (m_new, s_BxC, u_BxC, picked_BxC), None

    zeros = jnp.zeros((b, c), jnp.float32)
    init = (jnp.full((b, c), -jnp.inf, jnp.float32), zeros, zeros, zeros)
    (m_BxC, s_BxC, u_BxC, picked_BxC), _ = jax.lax.scan(jax.checkpoint(body), init, jnp.arange(n))
    logz_BxC = m_BxC + jnp.log(s_BxC)
    return picked_BxC - logz_BxC, (logz_BxC - u_BxC / s_BxC) if with_entropy else None


def probability_agreement(sampler_logp_NxL, trainer_logp_NxL, mask_NxL) -> dict[str, float]:
    """Sampler (rollout engine) vs trainer log-probs of the response tokens (`mask_NxL` > 0), host-side numpy in
    float64 — the train/infer mismatch meter:

    sampler_trainer_corr    Pearson correlation of the token probabilities p = exp(logp) (the M1 report's
                            0.987 → 0.997 number);
    sampler_trainer_abs_dp  mean |Δp| over tokens;
    logp_corr               Pearson correlation of the log-probs;
    logp_abs_diff_mean      mean over tokens of |log π_train − log π_rollout|;
    logp_abs_diff_max       mean over sequences (with response tokens) of the per-sequence max of that.
    """
    mask = np.asarray(mask_NxL) > 0
    lp_s = np.asarray(sampler_logp_NxL, np.float64)
    lp_t = np.asarray(trainer_logp_NxL, np.float64)
    if lp_s.shape != mask.shape or lp_t.shape != mask.shape:
        raise ValueError(f"sampler log-probs {lp_s.shape}, trainer log-probs {lp_t.shape} and mask {mask.shape} "
                         "must have one shape [N, L]")
    if not mask.any():
        return {"sampler_trainer_corr": 1.0, "sampler_trainer_abs_dp": 0.0, "logp_corr": 1.0,
                "logp_abs_diff_mean": 0.0, "logp_abs_diff_max": 0.0}
    diff_NxL = np.where(mask, np.abs(lp_t - lp_s), 0.0)
    rows = mask.any(axis=1)
    p_s, p_t = np.exp(lp_s[mask]), np.exp(lp_t[mask])
    return {"sampler_trainer_corr": _pearson(p_s, p_t), "sampler_trainer_abs_dp": float(np.mean(np.abs(p_s - p_t))),
            "logp_corr": _pearson(lp_s[mask], lp_t[mask]), "logp_abs_diff_mean": float(np.mean(diff_NxL[mask])),
            "logp_abs_diff_max": float(np.mean(diff_NxL.max(axis=1)[rows]))}


def _pearson(a_N: np.ndarray, b_N: np.ndarray) -> float:
    """Pearson correlation of two float64 vectors (1 when both are constant and equal, else 0 for a constant)."""
    da, db = a_N - a_N.mean(), b_N - b_N.mean()
    denom = np.sqrt(np.sum(da * da) * np.sum(db * db))
    return float(np.sum(da * db) / denom) if denom > 0 else (1.0 if np.allclose(a_N, b_N) else 0.0)
