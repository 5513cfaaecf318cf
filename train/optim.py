"""The optimizer of every m1jax training run: global-norm clipping → AdamW, with a warmup + cosine schedule.

    g ← g · min(1, c / ‖g‖₂)                                   (clip_by_global_norm, c = max_grad_norm)
    m ← β₁ m + (1 − β₁) g;   v ← β₂ v + (1 − β₂) g²;   m̂, v̂ bias-corrected
    θ ← θ − η_t (m̂ / (√v̂ + ε) + λ θ)                            (λ only on matrices, ndim ≥ 2 per layer)
    η_t = η · (t + 1) / W for t < W;  then η · (r + (1 − r) · ½(1 + cos(π (t − W) / (T − W))))   (r = min_lr_ratio)

Defaults follow the MiniMax-M1 report: β₁ = 0.9, β₂ = 0.95, ε = 1e-15 (its gradients span 1e-18 … 1e-5; the
usual 0.999 / 1e-8 did not converge). The trainer keeps fp32 master parameters, so the moments are fp32 even
when the model computes (and stores its rollout copy) in bf16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from m1jax.train.run_config import OptimizerSpec

from m1jax.layer_stack import is_stacked


def learning_rate_schedule(spec: OptimizerSpec, total_steps: int) -> optax.Schedule:
    """η_t of the module docstring for update t = 0, 1, …; `total_steps` (T) is used when `spec.decay_steps` is
    not set. Warmup starts at η / W (the first update is never a no-op) and reaches η at t = W − 1."""
    lr, warmup, ratio = spec.lr, spec.warmup_steps, spec.min_lr_ratio
    horizon = max(spec.decay_steps or total_steps, warmup + 1)

    def schedule(t):
        t = jnp.asarray(t, jnp.float32)
        warm = lr * jnp.minimum(1.0, (t + 1.0) / max(warmup, 1))
        if spec.schedule == "constant":
            return warm
        progress = jnp.clip((t - warmup) / max(horizon - warmup, 1), 0.0, 1.0)
        decayed = lr * (ratio + (1.0 - ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        return jnp.where(t < warmup, warm, decayed)

    return schedule


def schedule_horizon(spec: OptimizerSpec, total_steps: int) -> int:
    """The run length the schedule depends on: `total_steps` for a cosine without `decay_steps`, else 0 (unused).
    Passing this (not the raw step count) as the jit static keeps runs of different lengths on one compile."""
    return int(total_steps) if spec.schedule == "cosine" and spec.decay_steps is None else 0


def _decay_mask(params):
    """Decay the matrices: parameters with ≥ 2 axes per layer (a scanned model's group axis not counted)."""
    return jax.tree_util.tree_map_with_path(lambda path, p: p.ndim - is_stacked(path) >= 2, params)


def make_optimizer(spec: OptimizerSpec, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm(max_grad_norm) → AdamW(schedule, b1, b2, eps, weight_decay on matrices), fp32 moments."""
    adamw = optax.adamw(learning_rate_schedule(spec, total_steps), b1=spec.b1, b2=spec.b2, eps=spec.eps,
                        weight_decay=spec.weight_decay, mask=_decay_mask, mu_dtype=jnp.float32)
    if spec.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(spec.max_grad_norm), adamw)


def optimizer_step_count(opt_state) -> int:
    """Updates applied so far (the schedule's t), read from the Adam state."""
    for leaf_state in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState)):
        if isinstance(leaf_state, optax.ScaleByAdamState):
            return int(leaf_state.count)
    raise ValueError("optimizer state holds no Adam state")
