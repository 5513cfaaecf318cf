"""The jitted parameter update shared by every trainer: micro-batched gradient accumulation → one optax step.

For an optimizer step over rows S = S_1 ∪ … ∪ S_M (micro-batches) with step-level denominators D_b computed
ONCE over all of S (`m1jax.train.losses.token_normalizer`):

    loss(S) = Σ_j loss(S_j; D[S_j]),      ∇loss(S) = Σ_j ∇loss(S_j; D[S_j])          (sums — never means)

so the update is identical (up to float summation order) for any M. The policy losses are CISPO / GRPO-clip
(`m1jax.train.losses`), the next-token loss is  Σ_bt mask_bt · (−logp_bt) / D_b  with D_b = the step's token count.

Parameters are fp32 masters; each forward casts them to the model's compute dtypes (`param_dtypes`), so
gradients and the AdamW moments stay fp32. All functions are module-level `jax.jit`s keyed on hashable statics
(graphdef, dtypes, `LossSpec`, optimizer spec), so every trainer instance of the same model reuses the compiles.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from m1jax.train.logprobs import sequence_logprobs
from m1jax.train.losses import aggregate_token_terms, cispo_loss_and_metrics, grpo_clip_loss_and_metrics
from m1jax.train.optim import make_optimizer
from m1jax.train.run_config import OptimizerSpec

LOSS_KINDS = ("cispo", "grpo_clip", "nll")
# Token statistics of the policy losses, summed as mean × num_tokens over micro-batches.
_MEAN_STATS = ("clip_frac", "clip_frac_high", "clip_frac_low", "dropped_frac", "is_weight_mean", "ratio_mean",
               "approx_kl")
_MAX_STATS = ("is_weight_max", "ratio_max")
_MIN_STATS = ("ratio_min",)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Which loss and its static settings (hashable: a jit static)."""

    kind: str = "cispo"
    eps_low: float | None = None
    eps_high: float = 4.0
    masked: bool = False
    max_log_ratio: float = 20.0
    aux_loss_coef: float = 0.0
    entropy_bonus: bool = False  # add −β·H (β a traced argument of `update_step`, so it may follow a schedule)
    seq_chunk: int | None = None  # log-prob head in chunks of this many positions per row (None: all at once)
    vocab_chunk: int | None = None  # … and of this many vocabulary columns (None: all)

    def __post_init__(self):
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"loss kind must be one of {LOSS_KINDS}, got {self.kind!r}")


def cast_params(params, param_dtypes: tuple[str, ...], *, keep: str | None = None):
    """Master parameters cast leaf by leaf to the model's compute dtypes (same tree); leaves whose compute dtype
    is `keep`, except the LM head, are returned as stored (see `compute_model`)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    if len(leaves) != len(param_dtypes):
        raise ValueError(f"{len(param_dtypes)} dtypes for {len(leaves)} parameters")

    def cast(path, x, d):
        return x if d == keep and not _is_head(path) else x.astype(d)

    return jax.tree.unflatten(treedef, [cast(p, x, d) for (p, x), d in zip(leaves, param_dtypes)])


def _is_head(path) -> bool:
    """The LM head: the one weight the model reads in fp32 (`lm_head_logits`), so its rounding to the compute
    dtype must be done before, as in the rollout copy."""
    return any(getattr(k, "key", getattr(k, "name", None)) == "lm_head" for k in path)


def compute_model(graphdef, params, param_dtypes, frozen=None, *, cast_at_use: bool = False):
    """The model at `params` in its compute dtypes (works inside and outside jit). `frozen`: the rest of the
    model's state when `params` is only its trainable part (LoRA adapters; `graphdef` from the 3-way split).

    cast_at_use (full fine-tuning, `frozen` None): leave the parameters whose compute dtype is the model's
    activation dtype as fp32 masters: every module casts such a weight to that dtype where it reads it (inside
    the layer scan, per layer), which gives the same forward values as casting first, without a second
    full-size copy of the parameters (for use inside jit). LoRA adapters are always cast first.
    """
    rest = () if frozen is None else (frozen,)
    keep = nnx.merge(graphdef, params).config.dtype if cast_at_use and frozen is None else None
    return nnx.merge(graphdef, cast_params(params, param_dtypes, keep=keep), *rest)


# ----------------------------------------------------------------------------------------------- forward
@partial(jax.jit, static_argnames=("graphdef", "param_dtypes", "seq_chunk", "vocab_chunk"))
def forward_logprobs(params, tokens_BxL, valid_BxL, frozen=None, routed_experts_BxLxNxK=None, *, graphdef,
                     param_dtypes, seq_chunk=None, vocab_chunk=None):
    """(logp_BxL, entropy_BxL) of `sequence_logprobs` at `params`, no gradient (π_old, entropy, evaluation);
    `seq_chunk`, `vocab_chunk`: the head's chunking (`m1jax.train.logprobs.head_logprobs`); `routed_experts_BxLxNxK`:
    routing replay (None: the model's own routing)."""
    model = compute_model(graphdef, params, param_dtypes, frozen, cast_at_use=True)
    out = sequence_logprobs(model, tokens_BxL, valid_BxL=valid_BxL, with_entropy=True, seq_chunk=seq_chunk,
                            vocab_chunk=vocab_chunk, routed_experts_BxLxNxK=routed_experts_BxLxNxK)
    return out.logp_BxL, out.entropy_BxL


# ----------------------------------------------------------------------------------------------- loss
def batch_loss(params, batch: dict, entropy_coef=0.0, frozen=None, *, graphdef, param_dtypes, spec: LossSpec,
               aux_weight: float):
    """(loss, stats) of one micro-batch. `batch`: tokens_BxL, valid_BxL, mask_BxL (tokens that count),
    denom_B (step-level D_b slice), for the policy losses old_logp_BxL and adv_B, and optionally
    routed_experts_BxLxNxK (routing replay: the forward uses the rollout's routed experts).

    stats: sums over the micro-batch (num_tokens, loss, and mean-stat × num_tokens) plus extrema, ready to be
    combined across micro-batches by `_combine`. `frozen`: see `compute_model` (no gradient flows into it).
    """
    model = compute_model(graphdef, params, param_dtypes, frozen, cast_at_use=True)
    out = sequence_logprobs(model, batch["tokens_BxL"], valid_BxL=batch["valid_BxL"],
                            with_entropy=spec.entropy_bonus, with_aux_loss=spec.aux_loss_coef > 0,
                            seq_chunk=spec.seq_chunk, vocab_chunk=spec.vocab_chunk,
                            routed_experts_BxLxNxK=batch.get("routed_experts_BxLxNxK"))
    mask_BxL = batch["mask_BxL"]
    if spec.kind == "nll":
        loss = aggregate_token_terms(-out.logp_BxL, mask_BxL, batch["denom_B"])
        n = jnp.sum(mask_BxL != 0).astype(jnp.float32)
        stats = {"num_tokens": n, "nll_sum": jnp.sum(jnp.where(mask_BxL != 0, -out.logp_BxL, 0.0))}
    else:
        fn = cispo_loss_and_metrics if spec.kind == "cispo" else grpo_clip_loss_and_metrics
        kw = {"masked": spec.masked} if spec.kind == "cispo" else {}
        loss, metrics = fn(out.logp_BxL, batch["old_logp_BxL"], batch["adv_B"], mask_BxL, None,
                           eps_low=spec.eps_low, eps_high=spec.eps_high, normalizer=batch["denom_B"],
                           max_log_ratio=spec.max_log_ratio, **kw)
        n = metrics["num_tokens"].astype(jnp.float32)
        stats = {"num_tokens": n}
        stats.update({f"{k}_sum": metrics[k] * n for k in _MEAN_STATS})
        stats.update({k: metrics[k] for k in _MAX_STATS + _MIN_STATS})
    stats["policy_loss"] = loss
    if spec.entropy_bonus:  # optional −β·Σ_bt mask_bt H_bt / D_b (not part of CISPO proper; β may decay to 0)
        bonus = entropy_coef * aggregate_token_terms(out.entropy_BxL, mask_BxL, batch["denom_B"])
        stats["entropy_bonus"] = bonus
        loss = loss - bonus
    if spec.aux_loss_coef > 0:
        aux = spec.aux_loss_coef * aux_weight * out.aux_loss
        stats["aux_loss"] = aux
        loss = loss + aux
    return loss, jax.lax.stop_gradient(stats)


def _combine(acc: dict, new: dict) -> dict:
    out = {}
    for k, v in new.items():
        if k in _MAX_STATS:
            out[k] = jnp.maximum(acc[k], v)
        elif k in _MIN_STATS:
            out[k] = jnp.minimum(acc[k], v)
        else:
            out[k] = acc[k] + v
    return out


def _finalize(stats: dict) -> dict:
    n = stats["num_tokens"]
    out = {k: v for k, v in stats.items() if not k.endswith("_sum")}
    for k, v in stats.items():
        if k.endswith("_sum"):
            out[k[:-4] if k != "nll_sum" else "nll"] = v / jnp.maximum(n, 1.0)
    # Extrema of a step without tokens are reported as 0, not ±inf.
    for k in _MAX_STATS + _MIN_STATS:
        if k in out:
            out[k] = jnp.where(n > 0, out[k], 0.0)
    return out


# ----------------------------------------------------------------------------------------------- update
def accumulate_gradients(params, batch: dict, *, graphdef, param_dtypes, spec: LossSpec, micro_batches: int,
                         entropy_coef=0.0, frozen=None):
    """(Σ_j ∇loss_j, combined stats) over `micro_batches` equal row slices of `batch` (a `lax.scan`)."""
    grad_fn = jax.value_and_grad(batch_loss, has_aux=True)
    kw = dict(graphdef=graphdef, param_dtypes=param_dtypes, spec=spec, aux_weight=1.0 / micro_batches)
    if micro_batches == 1:
        (_, stats), grads = grad_fn(params, batch, entropy_coef, frozen, **kw)
        return grads, stats
    rows = batch["tokens_BxL"].shape[0]
    if rows % micro_batches:
        raise ValueError(f"micro_batches={micro_batches} must divide the {rows} rows of the batch")
    split = jax.tree.map(lambda x: x.reshape(micro_batches, rows // micro_batches, *x.shape[1:]), batch)
    first = jax.tree.map(lambda x: x[0], split)
    (_, stats0), grads0 = grad_fn(params, first, entropy_coef, frozen, **kw)

    def body(carry, mb):
        grads, stats = carry
        (_, s), g = grad_fn(params, mb, entropy_coef, frozen, **kw)
        return (jax.tree.map(jnp.add, grads, g), _combine(stats, s)), None

    rest = jax.tree.map(lambda x: x[1:], split)
    (grads, stats), _ = jax.lax.scan(body, (grads0, stats0), rest)
    return grads, stats


@partial(jax.jit, static_argnames=("graphdef", "param_dtypes", "spec", "optimizer", "total_steps", "micro_batches"),
         donate_argnums=(0, 1))
def update_step(params, opt_state, batch: dict, entropy_coef=0.0, frozen=None, *, graphdef, param_dtypes,
                spec: LossSpec, optimizer: OptimizerSpec, total_steps: int, micro_batches: int = 1):
    """One optimizer step on `batch` (see `batch_loss` for its keys; `denom_B` computed over the whole batch).

    Returns (params, opt_state, stats) with stats: loss (Σ over micro-batches), grad_norm (‖Σ∇‖₂ before
    clipping), num_tokens, and the token statistics of the loss. `params` and `opt_state` are donated.
    `entropy_coef` (β, traced: a schedule does not recompile) is used only if `spec.entropy_bonus`. `frozen`:
    the model state that is not trained (LoRA: the base weights; see `compute_model`), not donated.
    """
    grads, stats = accumulate_gradients(params, batch, graphdef=graphdef, param_dtypes=param_dtypes, spec=spec,
                                        micro_batches=micro_batches, entropy_coef=entropy_coef, frozen=frozen)
    tx = make_optimizer(optimizer, total_steps)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    stats = _finalize(stats)
    stats["grad_norm"] = optax.tree.norm(grads)
    stats["loss"] = stats["policy_loss"] + stats.get("aux_loss", 0.0) - stats.get("entropy_bonus", 0.0)
    return params, opt_state, stats


def optimizer_state_shardings(params, optimizer: OptimizerSpec, total_steps: int):
    """(abstract AdamW state of `params` (arrays or `jax.ShapeDtypeStruct`s with shardings), its shardings): the
    moments sharded like their parameters, every other leaf (step counts) replicated on the parameters' devices."""
    tx = make_optimizer(optimizer, total_steps)
    abstract = jax.eval_shape(tx.init, params)
    first = jax.tree.leaves(params)[0].sharding
    replicated = (jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
                  if isinstance(first, jax.sharding.NamedSharding) else first)
    param_tree = jax.tree.structure(params)
    param_shardings = jax.tree.map(lambda p: p.sharding, params)

    def like_params(node) -> bool:
        return jax.tree.structure(node) == param_tree

    shardings = jax.tree.map(lambda node: param_shardings if like_params(node) else replicated, abstract,
                             is_leaf=like_params)
    return abstract, shardings


def init_optimizer_state(params, optimizer: OptimizerSpec, total_steps: int):
    """AdamW state for `params` (moments shaped and sharded like the fp32 master parameters), created directly in
    that sharding (a jit with `out_shardings`: no moment passes through one device)."""
    _, shardings = optimizer_state_shardings(params, optimizer, total_steps)
    return jax.jit(make_optimizer(optimizer, total_steps).init, out_shardings=shardings)(params)


def abstract_optimizer_state(params, optimizer: OptimizerSpec, total_steps: int):
    """The AdamW state of `params` as `jax.ShapeDtypeStruct`s carrying their shardings (a restore target)."""
    abstract, shardings = optimizer_state_shardings(params, optimizer, total_steps)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
