"""Decoder layers as a scan: the L layers run as G groups of one period P of `layer_types` (MiniMax-M1: 10 groups
of 7 lightning + 1 softmax), one `jax.lax.scan` step per group, so XLA compiles one group, not L layers.

Parameters: position p of the period is one `DecoderLayer` whose parameters are stacked over the groups,
`stacked_layers[p].<name>` `[G, ...]` with logical axes `("layers", ...)`; layer i = g·P + p. Checkpoints, HF
names and exports keep the per-layer names `layers.{i}.<name>`: `layer_path` maps one to the other and
`stacked_views` / `per_layer_arrays` convert whole parameter maps in each direction.

Remat (`ModelConfig.remat`) wraps each scanned group (each layer when unrolled) in `jax.checkpoint`:
"full" saves only the group's input, "save_dots" also the weight products (dots without batch dimensions),
"offload" moves those to host memory (TPU/GPU only).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from m1jax.config import LIGHTNING, ModelConfig
from m1jax.modules.decoder import DecoderLayer
from m1jax.modules.lightning import layer_slopes
from m1jax.sharding import constrain

LAYERS = "layers"  # per-layer parameter paths: ("layers", i, ...)
STACKED = "stacked_layers"  # stacked parameter paths: ("stacked_layers", p, ...) with a leading group axis


# ------------------------------------------------------------------------------------- parameter layout
def layer_path(config: ModelConfig, stacked_path: tuple, group: int) -> tuple:
    """`("stacked_layers", p, *rest)`, group g → `("layers", g·P + p, *rest)`; any other path is unchanged."""
    if not stacked_path or stacked_path[0] != STACKED:
        return stacked_path
    return (LAYERS, group * config.layer_period + int(stacked_path[1]), *stacked_path[2:])


def _layer_table(config: ModelConfig, stacked_paths) -> dict[tuple, tuple[tuple, int]]:
    """{per-layer path: (stacked path, group)} for every stacked path (the inverse of `layer_path`)."""
    return {layer_path(config, path, g): (path, g) for path in stacked_paths if path[0] == STACKED
            for g in range(config.scan_groups)}


def stacked_views(config: ModelConfig, views: dict[tuple, object], stacked_paths) -> dict[tuple, object]:
    """Per-layer `{path: numpy-indexable view}` → the model's paths: each stacked parameter a lazy `[G, ...]`
    stack of its layers' views (reading a region reads only those layers' regions). Paths that are already the
    model's pass through."""
    from m1jax.convert.hf_layout import LazyStack

    table = _layer_table(config, stacked_paths)
    out, parts = {}, {}
    for path, view in views.items():
        if path in table:
            stacked, g = table[path]
            parts.setdefault(stacked, {})[g] = view
        else:
            out[path] = view
    for stacked, by_group in parts.items():
        if len(by_group) != config.scan_groups:
            continue  # incomplete: reported as missing by the caller
        out[stacked] = LazyStack([by_group[g] for g in range(config.scan_groups)])
    return out


def per_layer_arrays(config: ModelConfig, flat: dict[tuple, object], take: Callable = lambda x, g: x[g]
                     ) -> dict[tuple, object]:
    """The model's `{path: array}` → per-layer paths, each stacked array split into its G layers' slices
    `take(x, g)` (default `x[g]`; pass a lazy view to read nothing yet)."""
    out = {}
    for path, x in flat.items():
        if path and path[0] == STACKED:
            for g in range(config.scan_groups):
                out[layer_path(config, path, g)] = take(x, g)
        else:
            out[path] = x
    return out


def is_stacked(path) -> bool:
    """Whether a parameter path (tuple of keys or of pytree key entries) has the leading group axis."""
    first = path[0] if path else None
    return getattr(first, "key", getattr(first, "name", first)) == STACKED


def stacked_layer(config: ModelConfig, position: int, rngs) -> DecoderLayer:
    """The `DecoderLayer` at `position` of the period with every parameter stacked over the G groups (declared
    once in its module, initialised per group from its own key; logical axes gain the leading "layers")."""
    keys = jax.random.split(rngs.params(), config.scan_groups)
    graphdefs = []

    def make(key):
        graphdef, state = nnx.split(DecoderLayer(config, position, rngs=nnx.Rngs(key)))
        graphdefs.append(graphdef)
        return state

    state = jax.vmap(make)(keys)
    for _, var in nnx.to_flat_state(state):
        var.set_metadata(logical_axes=(LAYERS, *var.get_metadata()["logical_axes"]))
    return nnx.merge(graphdefs[0], state)


def group_slopes(config: ModelConfig) -> tuple:
    """Per period position: the lightning decay rates of that layer in every group `[G, H]` (None for softmax)."""
    p, h, n = config.layer_period, config.num_attention_heads, config.num_hidden_layers
    return tuple(np.stack([layer_slopes(h, g * p + pos, n) for g in range(config.scan_groups)])
                 if config.layer_types[pos] == LIGHTNING else None for pos in range(p))


# ------------------------------------------------------------------------------------------------ remat
def remat(fn: Callable, policy: str, *, prevent_cse: bool = True) -> Callable:
    """`fn` under `jax.checkpoint` with the named policy ("none" returns `fn`)."""
    if policy == "none":
        return fn
    cp = jax.checkpoint_policies
    if policy == "full":
        chosen = cp.nothing_saveable
    elif policy == "save_dots":
        chosen = cp.dots_with_no_batch_dims_saveable
    elif policy == "offload":
        if jax.default_backend() == "cpu":
            raise ValueError("config field 'remat': 'offload' moves saved activations to host memory, which the "
                             "cpu backend does not support; use 'save_dots' or 'full' there")
        chosen = cp.offload_dot_with_no_batch_dims("device", "pinned_host")
    else:
        raise ValueError(f"config field 'remat': unknown policy {policy!r}")
    return jax.checkpoint(fn, policy=chosen, prevent_cse=prevent_cse)


# ---------------------------------------------------------------------------------------------- forward
def _per_group(path, value) -> bool:
    from m1jax.modules.moe import PerGroup

    return isinstance(value.get_value() if isinstance(value, nnx.Variable) else value, PerGroup)


def scan_layers(stacked: nnx.List, h_BxLxD: jax.Array, *, ctx: dict, caches: tuple | None, config: ModelConfig,
                hidden_axes: tuple, collect_hidden: bool = False):
    """h after all G groups, with per position p: the new cache entries, routing stats and (if
    `collect_hidden`, else None) the layer's output h, stacked `[G, ...]`; h is constrained to the logical
    `hidden_axes` after every layer.

    `caches`: per position, that position's cache entries stacked over groups (`Cache.layers` of a scanned
    model), or None. They are the scan's carry, updated in place: group g's softmax layers write their new
    K/V into the stacks at [g, :, slots] and read their keys from there (`ctx["group"]`), a lightning
    layer's new state replaces slice g of its stack; so no group's cache is copied out of the stacks or back.
    Without caches the new entries (the lightning layers' final states) are the scan's stacked outputs.
    """
    # expert weights held per group (`moe.PerGroup`) stay out of the scanned inputs: the MoE selects group g's
    graphdefs, held, states = zip(*(nnx.split(layer, _per_group, ...) for layer in stacked), strict=True)
    slopes = group_slopes(config)
    softmax = tuple(kind != LIGHTNING for kind in config.layer_types[:config.layer_period])

    def group(carry, xs):
        h, caches = carry
        layer_states, layer_slopes_, g = xs
        group_ctx = {**ctx, "layer_offset": g * config.layer_period, "group": g}  # layer i = g·P + p
        new_caches, stats, hidden = [], [], []
        for p, graphdef in enumerate(graphdefs):
            layer = nnx.merge(graphdef, held[p], layer_states[p])
            if caches is None:
                layer_cache = None
            else:  # softmax: the whole stacks (updated in place); lightning: group g's state
                layer_cache = caches[p] if softmax[p] else caches[p][g]
            h, c, s = layer(h, ctx=group_ctx, layer_cache=layer_cache, slope_H=layer_slopes_[p])
            h = constrain(h, hidden_axes)
            if caches is not None and not softmax[p]:
                c = jax.lax.dynamic_update_index_in_dim(caches[p], c.astype(caches[p].dtype), g, axis=0)
            new_caches.append(c)
            stats.append(s)
            hidden.append(h)
        new_caches = tuple(new_caches)
        ys = (None if caches is not None else new_caches, tuple(stats), tuple(hidden) if collect_hidden else None)
        return (h, new_caches if caches is not None else None), ys

    body = remat(group, config.remat, prevent_cse=False)
    groups = jax.numpy.arange(config.scan_groups, dtype=jax.numpy.int32)
    (h, carried), (new_caches, stats, hidden) = jax.lax.scan(body, (h_BxLxD, caches), (tuple(states), slopes, groups))
    return h, (carried if caches is not None else new_caches, stats, hidden)
