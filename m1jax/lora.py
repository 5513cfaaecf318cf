"""Low-rank adapters (LoRA) on the attention projections and on every routed expert.

A targeted weight W (input dims `in`, output dims `out`, optional leading expert/group dims) gains two factors,
declared in the module beside W with the same leading and logical axes (so they shard and scan like W):

    A  [*lead, *in, r]   ~ U(−1/√fan_in, 1/√fan_in)        B  [*lead, r, *out]  = 0
    W_eff = W + (α / r) · A B                                (B = 0: the adapted model starts equal to the base)

`weight(module, name)` returns W_eff wherever a module reads W, inside its layer (so a scanned model merges one
layer group at a time and its backward holds one layer's ∂W_eff at a time). With int8 experts (`quantize=
"int8-experts"`) W is dequantized before the sum: the frozen base stays int8 in memory.

`ModelConfig.lora_rank` > 0 declares the factors (`lora_alpha` α, `lora_targets` ⊆ {"attention", "experts"}).
They are `LoRAParam`s, a subclass of `nnx.Param`: `nnx.split(model, LoRAParam, ...)` separates the trainable
adapters from the frozen base. `attach` adds fresh adapters to a loaded model, `merge` folds them into the base
weights (a plain model again: export it with `m1jax export`), `adapter_state` / `set_adapters` move adapters
in and out (trainer checkpoints hold only them).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from m1jax.config import ModelConfig
from m1jax.weights import DTYPE

LORA_TARGETS = ("attention", "experts")
# Targeted weights: name -> (target, number of input dims, number of output dims); leading dims are batch
# dims (the expert axis, a scanned model's group axis).
TARGET_WEIGHTS = {
    "qkv_proj": ("attention", 1, 2), "output_gate": ("attention", 1, 2), "out_proj": ("attention", 2, 1),
    "q_proj": ("attention", 1, 2), "k_proj": ("attention", 1, 2), "v_proj": ("attention", 1, 2),
    "o_proj": ("attention", 2, 1),
    "w1": ("experts", 1, 1), "w3": ("experts", 1, 1), "w2": ("experts", 1, 1),
}


class LoRAParam(nnx.Param):
    """A LoRA factor (trainable while the base `nnx.Param`s stay frozen)."""


def factor_names(name: str) -> tuple[str, str]:
    return f"{name}_lora_a", f"{name}_lora_b"


def is_targeted(config: ModelConfig, name: str) -> bool:
    return config.lora_rank > 0 and name in TARGET_WEIGHTS and TARGET_WEIGHTS[name][0] in config.lora_targets


def declare(module: nnx.Module, name: str, shape, axes, config: ModelConfig, rngs: nnx.Rngs) -> None:
    """Declare the factors of weight `name` (`shape`, logical `axes`, without a scanned group axis) on `module`
    if `config` targets it."""
    if not is_targeted(config, name):
        return
    _, n_in, n_out = TARGET_WEIGHTS[name]
    shape, axes = tuple(int(s) for s in shape), tuple(axes)
    lead = len(shape) - n_in - n_out
    r = config.lora_rank
    fan_in = math.prod(shape[lead:lead + n_in])
    a_shape = (*shape[:lead + n_in], r)
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound, bound).astype(DTYPE[config.param_dtype])
    b = jnp.zeros((*shape[:lead], r, *shape[lead + n_in:]), DTYPE[config.param_dtype])
    name_a, name_b = factor_names(name)
    setattr(module, name_a, LoRAParam(a, logical_axes=(*axes[:lead + n_in], None)))
    setattr(module, name_b, LoRAParam(b, logical_axes=(*axes[:lead], None, *axes[lead + n_in:])))


def delta(a, b, n_in: int, scale: float):
    """(α/r)·A B for A `[*lead, *in, r]`, B `[*lead, r, *out]` → `[*lead, *in, *out]` (fp32 accumulation)."""
    lead = a.ndim - 1 - n_in
    a2 = a.reshape(*a.shape[:lead], -1, a.shape[-1])
    b2 = b.reshape(*b.shape[:lead + 1], -1)
    d = jnp.matmul(a2.astype(jnp.float32), b2.astype(jnp.float32)) * scale
    return d.reshape(*a.shape[:-1], *b.shape[lead + 1:])


def weight(module: nnx.Module, name: str, value=None):
    """The weight `name` of `module` as the forward uses it: W + (α/r)·A B when it has adapters, else W as
    stored. `value`: W already read (e.g. an int8 expert stack dequantized by the caller)."""
    w = getattr(module, name)[...] if value is None else value
    name_a, name_b = factor_names(name)
    if not hasattr(module, name_a):
        return w
    c = module.config
    d = delta(getattr(module, name_a)[...], getattr(module, name_b)[...], TARGET_WEIGHTS[name][1],
              c.lora_alpha / c.lora_rank)
    return (w.astype(jnp.float32) + d).astype(w.dtype if jnp.issubdtype(w.dtype, jnp.floating) else jnp.float32)


def has_adapters(module: nnx.Module, name: str) -> bool:
    return hasattr(module, factor_names(name)[0])


# ------------------------------------------------------------------------------------------- model level
def adapter_state(model) -> nnx.State:
    """The adapters of `model` (every `LoRAParam`)."""
    return nnx.state(model, LoRAParam)


def attach(model, *, rank: int, alpha: float | None = None, targets=LORA_TARGETS, seed: int = 0):
    """`model` with fresh adapters of `rank` (α = `alpha`, default 2·rank) on `targets`; the base parameters
    are the same arrays (not copied), each adapter is created in the base weight's sharding when the base is
    sharded (a jitted init whose other outputs are dead code)."""
    from m1jax.loading import abstract_model, param_shardings

    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"lora rank must be an integer ≥ 1, got {rank!r}")
    if model.config.lora_rank:
        raise ValueError("the model already has adapters (merge them first: m1jax.lora.merge)")
    config = model.config.replace(lora_rank=rank, lora_alpha=float(2 * rank if alpha is None else alpha),
                                  lora_targets=tuple(targets))
    graphdef, adapters_abstract, _ = nnx.split(nnx.merge(*abstract_model(config)), LoRAParam, ...)
    mesh = _mesh_of(model)

    def init():
        from m1jax.model import MiniMaxM1

        return nnx.state(MiniMaxM1(config, rngs=nnx.Rngs(seed)), LoRAParam)

    shardings = None if mesh is None else param_shardings(adapters_abstract, mesh)
    adapters = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, adapters, nnx.state(model))


def merge(model):
    """A plain model (no adapters, `lora_rank` 0) whose targeted weights are W + (α/r)·A B, in W's dtype.
    Not for int8 experts (the sum is not int8): dequantize first (`m1jax export` does)."""
    from m1jax.loading import abstract_model

    c = model.config
    if c.lora_rank == 0:
        return model
    if c.quantize is not None and "experts" in c.lora_targets:
        raise ValueError("merging adapters into int8 experts would lose them; export the model dequantized "
                         "(m1jax export) or load the base with quantize=None before merging")
    plain = c.replace(lora_rank=0)
    graphdef, _ = abstract_model(plain)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for path, var in flat.items():
        if isinstance(var, LoRAParam):
            continue
        name = path[-1]
        a_path = (*path[:-1], factor_names(name)[0]) if isinstance(name, str) else None
        if a_path in flat:
            b_path = (*path[:-1], factor_names(name)[1])
            w = var.get_value()
            d = delta(flat[a_path].get_value(), flat[b_path].get_value(), TARGET_WEIGHTS[name][1],
                      c.lora_alpha / c.lora_rank)
            var = var.replace((w.astype(jnp.float32) + d).astype(w.dtype))
        out[path] = var
    return nnx.merge(graphdef, nnx.from_flat_state(out))


def set_adapters(model, adapters: nnx.State):
    """`model` with its adapters replaced by `adapters` (same structure, e.g. restored from a checkpoint)."""
    graphdef, _, base = nnx.split(model, LoRAParam, ...)
    return nnx.merge(graphdef, adapters, base)


def _mesh_of(model):
    for x in jax.tree.leaves(nnx.state(model)):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None
