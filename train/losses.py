"""CISPO and GRPO-clip policy losses, with one step-level token normaliser shared by both.

Notation (per optimizer step): rows b = 1..B are sampled responses, t = 1..T their token positions,
`mask_BxT` marks response tokens (nonzero = counts), `group_ids_B` names the prompt each response was sampled
for (the GRPO group), `A_b` is the response's advantage, and

    r_bt = exp(clamp(logp_bt - old_logp_bt, -max_log_ratio, max_log_ratio))      (importance ratio)

CISPO (MiniMax-M1 Eq. 4-5), per token, with a stop-gradient `sg` on the clipped IS weight:

    l_bt = -sg(clip(r_bt, 1 - eps_low, 1 + eps_high)) * A_b * logp_bt             (eps_low=None: no lower bound)
    grad l_bt = -clip(r_bt, ...) * A_b * grad logp_bt                             (no token is ever dropped)

Unified CISPO (Eq. 6-7, `masked=True`) multiplies l_bt by M_bt = 0 where (A_b > 0 and r_bt > 1 + eps_high) or
(A_b < 0 and r_bt < 1 - eps_low), else 1: exactly the tokens whose gradient PPO/GRPO clipping removes.

GRPO-clip (the baseline; PPO surrogate, no KL term):

    l_bt = -min(r_bt * A_b, clip(r_bt, 1 - eps_low, 1 + eps_high) * A_b)

Aggregation (the same code for every loss). With a per-row denominator D_b from `token_normalizer`,

    loss = sum_b sum_t mask_bt * l_bt / D_b                                       (a plain SUM over rows)

* `normalization="group"` (paper Eq. 4): D_b = K * N_g(b), N_g = sum of mask over the rows of group g,
  K = number of groups with N_g > 0. Then loss = (1/K) sum_g (1/N_g) sum_{b in g} sum_t mask_bt l_bt:
  a token mean inside each prompt's group, then a mean over prompts.
* `normalization="batch"` (TRL/verl "token-mean"): D_b = N = sum_bt mask_bt for every row.
  The two agree when every group has the same total length.

Normaliser contract (gradient accumulation and data parallelism). Compute
`denom_B = token_normalizer(mask_BxT, group_ids_B, ...)` ONCE on the whole optimizer-step batch (all
micro-batches, all devices), slice it with the same row indices as the data, and pass the slice as
`normalizer=`. Because the loss is a sum over rows, for any partition of the rows into micro-batches S_1..S_m

    sum_j loss(S_j, normalizer=denom_B[S_j]) == loss(full batch)      (and the same for the gradients),

so micro-batch losses/gradients are SUMMED (never averaged), and per-device losses are `psum`-ed. Under `jit`
with a batch-sharded global array `token_normalizer` already sees the global batch; inside `shard_map` compute
it outside (or from `all_gather`-ed masks) and pass the local slice. Partitions need not respect groups.
With `normalizer=None` the loss normalises over the batch it is given (correct only for a one-piece step).
The metrics of the `*_and_metrics` variants are plain statistics of the batch they see: combine micro-batches
by weighting means with `num_tokens` (and max/min of the extrema).

Gradients: old_logp is a constant. CISPO's weight is a constant (sg). GRPO-clip differentiates r; with the
log-ratio clamp, tokens with |logp - old_logp| > max_log_ratio get no gradient from r (CISPO's still do: its
gradient flows through logp itself).

All functions are jit-compatible; `group_ids` may be any integers (they are remapped with a static-size
`jnp.unique`), or, with `num_groups=G`, ids already in [0, G) are used as segment ids directly.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

Normalization = Literal["group", "batch"]
NORMALIZATIONS = ("group", "batch")


# ----------------------------------------------------------------------------------------------- validation


def _static_float(value, name: str, loss_name: str) -> float:
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(f"{loss_name}: {name} must be a static Python number, got {value!r}") from e


def _check_bounds(eps_low, eps_high, max_log_ratio, loss_name: str) -> tuple[float | None, float, float]:
    """Validated (eps_low, eps_high, max_log_ratio) as Python floats; rejects settings that silently break the
    objective. Both eps are OFFSETS: bounds are 1 - eps_low and 1 + eps_high."""
    eps_high = _static_float(eps_high, "eps_high", loss_name)
    if math.isnan(eps_high) or eps_high <= 0.0:
        raise ValueError(
            f"{loss_name}: eps_high={eps_high} gives an upper cap 1 + eps_high = {1.0 + eps_high} <= 1; eps_high is "
            "an OFFSET above 1 (CISPO practice: eps_high=4.0, i.e. cap 5). An absolute cap c is eps_high = c - 1."
        )
    if eps_low is not None:
        eps_low = _static_float(eps_low, "eps_low", loss_name)
        if math.isnan(eps_low) or eps_low < 0.0:
            raise ValueError(f"{loss_name}: eps_low={eps_low} is not a valid (negative or NaN) offset; "
                             "the lower bound is 1 - eps_low with 0 < eps_low < 1.")
        if eps_low == 0.0:
            raise ValueError(
                f"{loss_name}: eps_low=0 puts the lower bound at 1 (every ratio below 1 is raised to 1); "
                "for 'no lower bound' pass eps_low=None."
            )
        if eps_low >= 1.0:
            raise ValueError(
                f"{loss_name}: eps_low={eps_low} gives a lower bound 1 - eps_low = {1.0 - eps_low} <= 0; "
                "for 'no lower bound' pass eps_low=None."
            )
    max_log_ratio = _static_float(max_log_ratio, "max_log_ratio", loss_name)
    if not max_log_ratio > 0.0:
        raise ValueError(f"{loss_name}: max_log_ratio must be > 0, got {max_log_ratio}")
    return eps_low, eps_high, max_log_ratio


def _check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def _check_shapes(logp_BxT, old_logp_BxT, advantages_B, mask_BxT, group_ids_B, normalizer_B) -> None:
    if logp_BxT.ndim != 2:
        raise ValueError(f"logp must have shape [batch, seq], got {logp_BxT.shape}")
    B = logp_BxT.shape[0]
    for name, x in (("old_logp", old_logp_BxT), ("mask", mask_BxT)):
        if x.shape != logp_BxT.shape:
            raise ValueError(f"{name} must have the shape of logp {logp_BxT.shape}, got {x.shape}")
    for name, x in (("advantages", advantages_B), ("group_ids", group_ids_B), ("normalizer", normalizer_B)):
        if x is not None and x.shape != (B,):
            raise ValueError(f"{name} must have shape [batch] = ({B},), got {x.shape}")


# ----------------------------------------------------------------------------------------------- normaliser


@functools.partial(jax.jit, static_argnames=("normalization", "num_groups"))
def _denominators(mask_BxT, group_ids_B, *, normalization, num_groups):
    """D_b (see `token_normalizer`); num_groups=None remaps arbitrary ids with a static-size `jnp.unique`."""
    B = mask_BxT.shape[0]
    len_B = jnp.sum(mask_BxT != 0, axis=1, dtype=jnp.int32)
    if normalization == "batch":
        total = jnp.sum(len_B).astype(jnp.float32)
        return jnp.full((B,), jnp.maximum(total, 1.0), jnp.float32)
    if num_groups is None:
        fill = jnp.iinfo(group_ids_B.dtype).max
        _, seg_B = jnp.unique(group_ids_B, size=B, fill_value=fill, return_inverse=True)
        seg_B, num_segments = seg_B.reshape(B), B
    else:
        seg_B, num_segments = group_ids_B, num_groups
    len_G = jax.ops.segment_sum(len_B, seg_B, num_segments=num_segments)
    num_present = jnp.sum(len_G > 0).astype(jnp.float32)
    denom_B = len_G[seg_B].astype(jnp.float32) * num_present
    return jnp.where(denom_B > 0, denom_B, 1.0)


def token_normalizer(
    mask: jax.Array,
    group_ids: jax.Array | None = None,
    *,
    normalization: Normalization = "group",
    num_groups: int | None = None,
) -> jax.Array:
    """Per-row loss denominators D_b [batch] (float32) for the whole optimizer step.

    "group":  D_b = K * N_{g(b)},  N_g = sum_{b' in g} sum_t mask_b't,  K = #{g : N_g > 0}
    "batch":  D_b = N = sum_bt mask_bt

    so that `sum_bt mask_bt * l_bt / D_b` is the group-mean-of-token-means (Eq. 4) or the batch token mean.
    Denominators that would be 0 (no response tokens at all in the row's group / the batch) are set to 1; such
    rows contribute nothing. Groups without response tokens are not counted in K.

    Call it on the FULL step batch (all micro-batches and devices) and slice the result per micro-batch: see the
    module docstring for the contract. group_ids: any integers (remapped, jit-compatible, static size = batch);
    or pass a static `num_groups` = G when the ids are already in [0, G) (checked when the ids are concrete).
    """
    _check_normalization(normalization)
    mask_BxT = jnp.asarray(mask)
    if mask_BxT.ndim != 2:
        raise ValueError(f"mask must have shape [batch, seq], got {mask_BxT.shape}")
    B = mask_BxT.shape[0]
    if normalization == "batch":
        return _denominators(mask_BxT, None, normalization="batch", num_groups=None)
    if group_ids is None:
        raise ValueError('normalization="group" needs group_ids (the prompt/group index of every row)')
    group_ids_B = jnp.asarray(group_ids)
    if group_ids_B.shape != (B,):
        raise ValueError(f"group_ids must have shape [batch] = ({B},), got {group_ids_B.shape}")
    if not jnp.issubdtype(group_ids_B.dtype, jnp.integer):
        raise ValueError(f"group_ids must be integers, got dtype {group_ids_B.dtype}")
    if num_groups is not None:
        num_groups = int(num_groups)
        if not isinstance(group_ids_B, jax.core.Tracer) and B:
            lo, hi = int(group_ids_B.min()), int(group_ids_B.max())
            if lo < 0 or hi >= num_groups:
                raise ValueError(
                    f"with num_groups={num_groups}, group_ids must lie in [0, {num_groups}); got [{lo}, {hi}]"
                )
    return _denominators(mask_BxT, group_ids_B, normalization="group", num_groups=num_groups)


def aggregate_token_terms(term_BxT: jax.Array, mask_BxT: jax.Array, denom_B: jax.Array) -> jax.Array:
    """loss = sum_b sum_t [mask_bt != 0] * term_bt / D_b  (padded positions are excluded with `where`)."""
    return jnp.sum(jnp.where(mask_BxT != 0, term_BxT, 0.0) / denom_B[:, None])


# ----------------------------------------------------------------------------------------------- losses


def _inputs(logp, old_logp, advantages, mask, group_ids, normalization, normalizer):
    """Validated arrays and the per-row denominators D_b (from `normalizer`, else from this batch)."""
    logp_BxT, old_logp_BxT, mask_BxT = jnp.asarray(logp), jnp.asarray(old_logp), jnp.asarray(mask)
    advantages_B = jnp.asarray(advantages)
    group_ids_B = None if group_ids is None else jnp.asarray(group_ids)
    normalizer_B = None if normalizer is None else jnp.asarray(normalizer)
    _check_shapes(logp_BxT, old_logp_BxT, advantages_B, mask_BxT, group_ids_B, normalizer_B)
    if normalizer_B is None:
        denom_B = token_normalizer(mask_BxT, group_ids_B, normalization=normalization)
    else:
        denom_B = normalizer_B.astype(jnp.float32)
    return logp_BxT, old_logp_BxT, advantages_B, mask_BxT, denom_B


def _ratios(logp_BxT, old_logp_BxT, advantages_B, mask_BxT, max_log_ratio):
    """Sanitised logp, log-ratio, ratio, A [B, 1] and the token mask, shared by both losses.

    Padded positions get logp = old_logp = 0 before any arithmetic, so NaN/inf there cannot leak into the
    loss or (through the backward pass) into the gradient. old_logp is a constant (stop_gradient). Low-precision
    log-probs are promoted to float32: the loss is a long sum and r = exp(.) amplifies rounding.
    """
    dtype = jnp.promote_types(logp_BxT.dtype, jnp.float32)
    valid_BxT = mask_BxT != 0
    logp_BxT = jnp.where(valid_BxT, logp_BxT.astype(dtype), 0.0)
    old_logp_BxT = jnp.where(valid_BxT, jax.lax.stop_gradient(old_logp_BxT).astype(dtype), 0.0)
    log_ratio_BxT = jnp.clip(logp_BxT - old_logp_BxT, -max_log_ratio, max_log_ratio)
    ratio_BxT = jnp.exp(log_ratio_BxT)
    adv_Bx1 = advantages_B.astype(dtype)[:, None]
    return logp_BxT, log_ratio_BxT, ratio_BxT, adv_Bx1, valid_BxT


def _clip_regions(ratio_BxT, adv_Bx1, lower, upper):
    """(above cap, below floor, PPO-dropped) boolean token maps; the last is 1 - M of Eq. 7."""
    high_BxT = ratio_BxT > upper
    low_BxT = ratio_BxT < lower  # never true for lower = 0 (eps_low=None): r > 0
    dropped_BxT = ((adv_Bx1 > 0) & high_BxT) | ((adv_Bx1 < 0) & low_BxT)
    return high_BxT, low_BxT, dropped_BxT


def _bounds(eps_low: float | None, eps_high: float) -> tuple[float, float]:
    """(1 - eps_low, 1 + eps_high); eps_low=None gives lower bound 0, i.e. none (r > 0 anyway)."""
    return (0.0 if eps_low is None else 1.0 - eps_low), 1.0 + eps_high


def _token_metrics(ratio_BxT, log_ratio_BxT, weight_BxT, valid_BxT, high_BxT, low_BxT, dropped_BxT) -> dict:
    """Token means/extrema over the response tokens of THIS batch (combine micro-batches by `num_tokens`).

    The per-token quantities are stacked so that all means are one reduction (and all extrema one more):
    this keeps the compiled graph small.
    """
    f32 = jnp.float32
    n = jnp.sum(valid_BxT, dtype=jnp.int32)
    mean_names = ("clip_frac", "clip_frac_high", "clip_frac_low", "dropped_frac", "is_weight_mean", "ratio_mean",
                  "approx_kl")
    per_token_KxBxT = jnp.stack([
        (high_BxT | low_BxT).astype(f32), high_BxT.astype(f32), low_BxT.astype(f32), dropped_BxT.astype(f32),
        weight_BxT.astype(f32), ratio_BxT.astype(f32),
        # k3 estimator of KL(pi_old || pi_theta) from samples of pi_old: r - 1 - log r >= 0.
        (ratio_BxT - 1.0 - log_ratio_BxT).astype(f32),
    ])
    means_K = jnp.sum(jnp.where(valid_BxT, per_token_KxBxT, 0.0), axis=(1, 2)) / jnp.maximum(n, 1).astype(f32)
    extreme_names = ("is_weight_max", "ratio_max", "ratio_min")
    signed_KxBxT = jnp.stack([weight_BxT, ratio_BxT, -ratio_BxT]).astype(f32)
    extremes_K = jnp.max(jnp.where(valid_BxT, signed_KxBxT, -jnp.inf), axis=(1, 2))
    extremes_K = jnp.where(n > 0, extremes_K * jnp.array([1.0, 1.0, -1.0], f32), 0.0)
    metrics = {"num_tokens": n}
    metrics.update({name: means_K[k] for k, name in enumerate(mean_names)})
    metrics.update({name: extremes_K[k] for k, name in enumerate(extreme_names)})
    return jax.lax.stop_gradient(metrics)


# The bounds and the clamp are traced scalars (one compilation serves every setting); the flags are static.
@functools.partial(jax.jit, static_argnames=("masked", "with_metrics"))
def _cispo_core(logp_BxT, old_logp_BxT, advantages_B, mask_BxT, denom_B, lower, upper, max_log_ratio, *, masked,
                with_metrics):
    logp_BxT, log_ratio_BxT, ratio_BxT, adv_Bx1, valid_BxT = _ratios(
        logp_BxT, old_logp_BxT, advantages_B, mask_BxT, max_log_ratio
    )
    weight_BxT = jax.lax.stop_gradient(jnp.clip(ratio_BxT, lower, upper))
    high_BxT, low_BxT, dropped_BxT = _clip_regions(ratio_BxT, adv_Bx1, lower, upper)
    term_BxT = -weight_BxT * adv_Bx1 * logp_BxT
    if masked:
        term_BxT = jnp.where(dropped_BxT, 0.0, term_BxT)
    loss = aggregate_token_terms(term_BxT, valid_BxT, denom_B)
    if not with_metrics:
        return loss, {}
    return loss, _token_metrics(ratio_BxT, log_ratio_BxT, weight_BxT, valid_BxT, high_BxT, low_BxT, dropped_BxT)


@functools.partial(jax.jit, static_argnames=("with_metrics",))
def _grpo_clip_core(logp_BxT, old_logp_BxT, advantages_B, mask_BxT, denom_B, lower, upper, max_log_ratio, *,
                    with_metrics):
    _, log_ratio_BxT, ratio_BxT, adv_Bx1, valid_BxT = _ratios(
        logp_BxT, old_logp_BxT, advantages_B, mask_BxT, max_log_ratio
    )
    clipped_BxT = jnp.clip(ratio_BxT, lower, upper)
    term_BxT = -jnp.minimum(ratio_BxT * adv_Bx1, clipped_BxT * adv_Bx1)
    loss = aggregate_token_terms(term_BxT, valid_BxT, denom_B)
    if not with_metrics:
        return loss, {}
    high_BxT, low_BxT, dropped_BxT = _clip_regions(ratio_BxT, adv_Bx1, lower, upper)
    return loss, _token_metrics(ratio_BxT, log_ratio_BxT, clipped_BxT, valid_BxT, high_BxT, low_BxT, dropped_BxT)


def _cispo(logp, old_logp, advantages, mask, group_ids, *, eps_low, eps_high, normalization, normalizer, masked,
           max_log_ratio, with_metrics):
    eps_low, eps_high, max_log_ratio = _check_bounds(eps_low, eps_high, max_log_ratio, "cispo_loss")
    _check_normalization(normalization)
    arrays = _inputs(logp, old_logp, advantages, mask, group_ids, normalization, normalizer)
    lower, upper = _bounds(eps_low, eps_high)
    return _cispo_core(*arrays, lower, upper, max_log_ratio, masked=bool(masked), with_metrics=with_metrics)


def _grpo_clip(logp, old_logp, advantages, mask, group_ids, *, eps_low, eps_high, normalization, normalizer,
               max_log_ratio, with_metrics):
    eps_low, eps_high, max_log_ratio = _check_bounds(eps_low, eps_high, max_log_ratio, "grpo_clip_loss")
    _check_normalization(normalization)
    arrays = _inputs(logp, old_logp, advantages, mask, group_ids, normalization, normalizer)
    lower, upper = _bounds(eps_low, eps_high)
    return _grpo_clip_core(*arrays, lower, upper, max_log_ratio, with_metrics=with_metrics)


def cispo_loss_and_metrics(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    group_ids: jax.Array | None,
    *,
    eps_low: float | None = None,
    eps_high: float = 4.0,
    normalization: Normalization = "group",
    normalizer: jax.Array | None = None,
    masked: bool = False,
    max_log_ratio: float = 20.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CISPO loss (Eq. 4-5; `masked=True`: unified Eq. 6-7) and token metrics.

        loss = sum_bt mask_bt * M_bt * (-sg(clip(r_bt, 1 - eps_low, 1 + eps_high)) * A_b * logp_bt) / D_b

    with M = 1 unless `masked`. Shapes: logp/old_logp/mask [B, T], advantages/group_ids [B]. `normalizer` is the
    step-level D_b slice from `token_normalizer` (then `group_ids`/`normalization` are not used); without it D_b
    is computed from this batch. eps_low/eps_high are static offsets (cap 1 + eps_high must exceed 1;
    eps_low=None: no lower bound).

    Metrics (token statistics of THIS batch, no gradient): num_tokens, clip_frac (r outside the bounds),
    clip_frac_high, clip_frac_low, dropped_frac (tokens with M = 0; dropped only if `masked`), is_weight_mean,
    is_weight_max (clipped weights), ratio_mean/max/min, approx_kl (mean of r - 1 - log r).
    """
    return _cispo(logp, old_logp, advantages, mask, group_ids, eps_low=eps_low, eps_high=eps_high,
                  normalization=normalization, normalizer=normalizer, masked=masked, max_log_ratio=max_log_ratio,
                  with_metrics=True)


def cispo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    group_ids: jax.Array | None,
    *,
    eps_low: float | None = None,
    eps_high: float = 4.0,
    normalization: Normalization = "group",
    normalizer: jax.Array | None = None,
    masked: bool = False,
    max_log_ratio: float = 20.0,
) -> jax.Array:
    """Scalar CISPO loss; see `cispo_loss_and_metrics` (same arguments) and the module docstring."""
    return _cispo(logp, old_logp, advantages, mask, group_ids, eps_low=eps_low, eps_high=eps_high,
                  normalization=normalization, normalizer=normalizer, masked=masked, max_log_ratio=max_log_ratio,
                  with_metrics=False)[0]


def grpo_clip_loss_and_metrics(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    group_ids: jax.Array | None,
    *,
    eps_low: float | None = 0.2,
    eps_high: float = 0.2,
    normalization: Normalization = "group",
    normalizer: jax.Array | None = None,
    max_log_ratio: float = 20.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO-clip (PPO surrogate, no KL) with the same aggregation as CISPO:

        loss = sum_bt mask_bt * (-min(r_bt * A_b, clip(r_bt, 1 - eps_low, 1 + eps_high) * A_b)) / D_b

    r carries gradient (old_logp is a constant); tokens counted in "dropped_frac" get zero gradient. eps_low=None:
    no lower clip. Defaults are PPO's symmetric 0.2 (DAPO's clip-higher: eps_high=0.28). Metrics as for CISPO,
    with the clipped ratio as "is_weight".
    """
    return _grpo_clip(logp, old_logp, advantages, mask, group_ids, eps_low=eps_low, eps_high=eps_high,
                      normalization=normalization, normalizer=normalizer, max_log_ratio=max_log_ratio,
                      with_metrics=True)


def grpo_clip_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    group_ids: jax.Array | None,
    *,
    eps_low: float | None = 0.2,
    eps_high: float = 0.2,
    normalization: Normalization = "group",
    normalizer: jax.Array | None = None,
    max_log_ratio: float = 20.0,
) -> jax.Array:
    """Scalar GRPO-clip loss; see `grpo_clip_loss_and_metrics`."""
    return _grpo_clip(logp, old_logp, advantages, mask, group_ids, eps_low=eps_low, eps_high=eps_high,
                      normalization=normalization, normalizer=normalizer, max_log_ratio=max_log_ratio,
                      with_metrics=False)[0]
