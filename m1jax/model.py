"""`MiniMaxM1`: the MiniMax-M1 / MiniMax-Text-01 causal LM in Flax NNX (remote-code semantics).

    h = Embed(tokens);  h = DecoderLayer_l(h) for l = 0..L−1;  logits = RMSNorm(h) · W_lm   (head in fp32)

Parameter names follow the original checkpoint (`embed_tokens`, `layers[l].self_attn.qkv_proj`,
`layers[l].block_sparse_moe.w1`, `norm`, `lm_head`, ...) with JAX layouts (`[in, out]`, heads split out).
When `config.scan_groups` > 0 the layers are held stacked per position of the layer period and run as one
`lax.scan` over the groups (`m1jax.layer_stack`: `stacked_layers[p]`, layer i = g·P + p); `layer(i)` reads one
layer either way.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from m1jax.cache import Cache, unstack_groups
from m1jax.config import ModelConfig
from m1jax.layer_stack import remat, scan_layers, stacked_layer
from m1jax.modules.decoder import DecoderLayer
from m1jax.modules.norm import rms_norm
from m1jax.modules.rope import rope_tables
from m1jax.modules.unfused import dot_boundary, linear
from m1jax.sharding import constrain
from m1jax.weights import DTYPE, param

HIDDEN_AXES = ("batch", "seq", None)  # hidden states: split over batch, and over the sequence at long context


@struct.dataclass
class ModelOutput:
    """logits `[B, L, V]` fp32 (or `[B, 1, V]` with `logits="last"`, None with `logits="none"`); `hidden` the
    final-normed hidden states; `cache` the updated cache (if one was given); `lightning_states` the final
    state of each lightning layer (in layer order); `routing` per-layer routing statistics (if requested);
    `layer_hidden` each decoder layer's output `[B, L, D]` before the final norm (if requested)."""

    logits: jax.Array | None
    hidden: jax.Array
    cache: Cache | None = None
    lightning_states: tuple = ()
    routing: tuple | None = None
    layer_hidden: tuple | None = None

    def routed_experts(self) -> jax.Array:
        """The routed experts of every token in every layer, `[B, L, layers, k]` int32 (`NO_EXPERT` = dropped),
        from a call with `return_routing="experts"` — the replay input of `MiniMaxM1.__call__`."""
        if self.routing is None or "routed_experts" not in self.routing[0]:
            raise ValueError('routed experts were not recorded: call the model with return_routing="experts"')
        return jnp.stack([stats["routed_experts"] for stats in self.routing], axis=2)


class MiniMaxM1(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        v, d = config.vocab_size, config.hidden_size
        std = config.initializer_range
        self.embed_tokens = param(rngs, (v, d), ("vocab", "embed"), config.param_dtype, std=std)
        if config.scan_groups:
            self.stacked_layers = nnx.List([stacked_layer(config, p, rngs) for p in range(config.layer_period)])
        else:
            self.layers = nnx.List([DecoderLayer(config, i, rngs=rngs) for i in range(config.num_hidden_layers)])
        self.norm = param(rngs, (d,), ("embed",), config.param_dtype, init="ones")
        self.lm_head = param(rngs, (d, v), ("embed", "vocab"), config.param_dtype, std=std)

    def __call__(self, tokens_BxL: jax.Array, *, positions_BxL: jax.Array | None = None,
                 valid_BxL: jax.Array | None = None, cache: Cache | None = None, logits: str = "all",
                 return_routing: bool | str = False, return_hidden: bool = False, moe_impl: str | None = None,
                 expert_threshold: jax.Array | None = None, routed_experts=None) -> ModelOutput:
        """Forward pass over int32 token ids `[B, L]`.

        positions_BxL: RoPE positions (default: 0..L−1, or continuing the cache).
        valid_BxL: False marks padding (never attended to, never added to a lightning state).
        cache: if given, the tokens are appended at slots `cache.length ...` and the updated cache returned.
        logits: "all" | "last" (only position L−1) | "none".
        return_hidden: also return every layer's output (`ModelOutput.layer_hidden`, for `m1jax.verify`).
        return_routing: True → `ModelOutput.routing`, per layer the routing log of `moe.routing_stats` (tokens per
            expert, experts_used_frac, expert FLOPs and FLOPs saved, ...); "experts" also keeps each token's
            routed experts (`routed_experts` `[B, L, k]` per layer; `ModelOutput.routed_experts()` stacks them).
        expert_threshold: `[B]` fp32 per row, None = exact top-k. Each token keeps the smallest prefix of its
            top-k experts (descending renormalised routing weight) whose weights sum to ≥ the threshold, and the
            kept weights are renormalised to sum to 1; 1.0 keeps all k (bit-identical to None). Values must lie
            in (0, 1] (callers validate: the values are traced here).
        routed_experts: routing replay — `[B, L, layers, k]` int32 (or a sequence of per-layer `[B, L, k]`)
            expert ids used instead of each layer's own top-k, `NO_EXPERT` (−1) for a dropped choice; the
            weights are this router's probabilities of the given experts, renormalised over them. Not together
            with `expert_threshold` (the replayed routing already holds its drops).
        """
        c = self.config
        if tokens_BxL.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tokens_BxL.shape}")
        if not jnp.issubdtype(tokens_BxL.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer ids, got dtype {tokens_BxL.dtype}")
        if logits not in ("all", "last", "none"):
            raise ValueError(f"logits must be 'all', 'last' or 'none', got {logits!r}")
        if return_routing not in (False, True, "experts"):
            raise ValueError(f'return_routing must be False, True or "experts", got {return_routing!r}')
        b, l = tokens_BxL.shape
        dt = DTYPE[c.dtype]
        ctx: dict[str, Any] = {"valid_BxL": valid_BxL, "moe_impl": moe_impl}
        ctx.update(_routing_inputs(c, b, l, expert_threshold, routed_experts))
        if valid_BxL is None:
            valid_BxL = jnp.ones((b, l), bool)
        if cache is not None:
            if cache.batch_size != b:
                raise ValueError(f"cache holds {cache.batch_size} sequences, tokens have batch {b}")
            if cache.groups != c.scan_groups:
                raise ValueError(f"cache is laid out for {cache.groups} scanned layer groups, the model has "
                                 f"{c.scan_groups} (make it with init_cache of this model's config)")
            start = cache.length
            ctx["cache_start"] = start
            ctx["cache_valid_BxS"] = jax.lax.dynamic_update_slice_in_dim(cache.valid_BxS, valid_BxL, start, axis=1)
            default_pos = start + jnp.arange(l)
        else:
            default_pos = jnp.arange(l)
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(default_pos, (b, l))
        ctx["cos"], ctx["sin"] = rope_tables(positions_BxL, c.rope_dim, c.rope_theta)

        h = constrain(self.embed_tokens[...][tokens_BxL].astype(dt), HIDDEN_AXES)
        layer_caches = None if cache is None else cache.layers
        if c.scan_groups:
            h, (new_layers, stats, hidden) = scan_layers(self.stacked_layers, h, ctx=ctx, caches=layer_caches,
                                                        config=c, hidden_axes=HIDDEN_AXES, collect_hidden=return_hidden)
            per_layer, routing = unstack_groups(new_layers, c.scan_groups), unstack_groups(stats, c.scan_groups)
            hidden = unstack_groups(hidden, c.scan_groups) if return_hidden else None
        else:
            per_layer, routing, hidden = [], [], []
            for i, layer in enumerate(self.layers):
                h, layer_cache, layer_stats = _apply_layer(layer, h, ctx, None if cache is None else layer_caches[i],
                                                           c.remat)
                h = constrain(h, HIDDEN_AXES)
                per_layer.append(layer_cache)
                routing.append(layer_stats)
                if return_hidden:
                    hidden.append(h)
            new_layers = tuple(per_layer)
        states = [per_layer[i] for i in c.lightning_layers]
        h = rms_norm(h, self.norm[...], c.rms_norm_eps)
        out_logits = None
        if logits != "none":
            hl = h[:, -1:] if logits == "last" else h
            out_logits = self.lm_head_logits(hl)
        new_cache = None
        if cache is not None:
            new_cache = cache.replace(layers=tuple(new_layers), valid_BxS=ctx["cache_valid_BxS"],
                                      length=cache.length + l)
        if return_routing != "experts":
            routing = [{k: v for k, v in stats.items() if k != "routed_experts"} for stats in routing]
        return ModelOutput(logits=out_logits, hidden=h, cache=new_cache, lightning_states=tuple(states),
                           routing=tuple(routing) if return_routing else None,
                           layer_hidden=tuple(hidden) if return_hidden else None)

    def layer(self, i: int) -> DecoderLayer:
        """Decoder layer `i` (for a scanned model: a copy of its slice of the stacked parameters)."""
        c = self.config
        if not 0 <= i < c.num_hidden_layers:
            raise IndexError(f"layer {i} out of range: the model has {c.num_hidden_layers} layers")
        if not c.scan_groups:
            return self.layers[i]
        graphdef, state = nnx.split(self.stacked_layers[i % c.layer_period])
        state = jax.tree.map(lambda x: x[i // c.layer_period], state)
        for _, var in nnx.to_flat_state(state):
            var.set_metadata(logical_axes=var.get_metadata()["logical_axes"][1:])
        layer = nnx.merge(graphdef, state)
        layer.layer_idx = layer.self_attn.layer_idx = i
        return layer

    def lm_head_logits(self, h_BxLxD: jax.Array, columns_DxV: jax.Array | None = None) -> jax.Array:
        """fp32 LM head: logits = h·W_lm with both operands in fp32 (tech report §3.2); `columns_DxV`: a subset of
        W_lm's columns (a vocabulary chunk) to use instead of the whole head."""
        w_DxV = self.lm_head[...] if columns_DxV is None else columns_DxV
        h = dot_boundary(h_BxLxD.astype(jnp.float32))
        return dot_boundary(linear(h, w_DxV.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST))


def _routing_inputs(c: ModelConfig, b: int, l: int, expert_threshold, routed_experts) -> dict[str, jax.Array]:
    """The MoE inputs of the context: `expert_threshold_BxL` (fp32) and/or `routed_experts_BxLxNxK` (int32), each
    checked against the batch `[b, l]` and the model."""
    out = {}
    if expert_threshold is not None and routed_experts is not None:
        raise ValueError("pass expert_threshold or routed_experts, not both: replayed routing already holds the "
                         "threshold's dropped experts")
    if expert_threshold is not None:
        tau_B = jnp.asarray(expert_threshold)
        if tau_B.shape != (b,) or not jnp.issubdtype(tau_B.dtype, jnp.floating):
            raise ValueError(f"expert_threshold must be a float array [batch] = [{b}], got {tau_B.dtype} "
                             f"{tau_B.shape}")
        out["expert_threshold_BxL"] = jnp.broadcast_to(tau_B.astype(jnp.float32)[:, None], (b, l))
    if routed_experts is not None:
        if isinstance(routed_experts, (list, tuple)):
            routed_experts = jnp.stack([jnp.asarray(r) for r in routed_experts], axis=2)
        r = jnp.asarray(routed_experts)
        n = c.num_hidden_layers
        if r.ndim != 4 or r.shape[:3] != (b, l, n) or not 1 <= r.shape[3] <= c.num_local_experts:
            raise ValueError(f"routed_experts must be [batch, seq, layers, k] = [{b}, {l}, {n}, k] with 1 ≤ k ≤ "
                             f"{c.num_local_experts} (or {n} arrays [batch, seq, k]), got shape {r.shape}")
        if not jnp.issubdtype(r.dtype, jnp.integer):
            raise ValueError(f"routed_experts must be integer expert ids, got dtype {r.dtype}")
        out["routed_experts_BxLxNxK"] = r.astype(jnp.int32)
    return out


def _apply_layer(layer: DecoderLayer, h, ctx, layer_cache, policy: str):
    """One unrolled layer, under `jax.checkpoint` with the remat `policy` unless it is "none"."""
    if policy == "none":
        return layer(h, ctx=ctx, layer_cache=layer_cache)
    graphdef, state = nnx.split(layer)
    return remat(lambda st, x, lc: nnx.merge(graphdef, st)(x, ctx=ctx, layer_cache=lc), policy)(state, h, layer_cache)
