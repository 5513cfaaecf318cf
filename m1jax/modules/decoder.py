"""One MiniMax-M1 decoder layer: token mixer (lightning or softmax) + MoE, with the DeepNorm residual (spec §6).

    x = RMSNorm_in(h);   r = x if postnorm else h;   h = α_attn·r + β_attn·Attn(x)
    x = RMSNorm_post(h); r = x if postnorm else h;   h = α_mlp·r  + β_mlp·MoE(x)
"""

from __future__ import annotations

import jax
from flax import nnx

from m1jax.config import LIGHTNING, ModelConfig
from m1jax.modules.lightning import LightningAttention
from m1jax.modules.moe import MoE
from m1jax.modules.norm import rms_norm
from m1jax.modules.softmax_attention import SoftmaxAttention
from m1jax.weights import param


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
        self.config = config
        self.layer_idx = layer_idx
        self.kind = config.layer_types[layer_idx]
        d = config.hidden_size
        self.input_layernorm = param(rngs, (d,), ("embed",), config.param_dtype, init="ones")
        self.post_attention_layernorm = param(rngs, (d,), ("embed",), config.param_dtype, init="ones")
        if self.kind == LIGHTNING:
            self.self_attn = LightningAttention(config, layer_idx, rngs=rngs)
            self.alpha, self.beta = config.linear_attn_alpha, config.linear_attn_beta
        else:
            self.self_attn = SoftmaxAttention(config, layer_idx, rngs=rngs)
            self.alpha, self.beta = config.full_attn_alpha, config.full_attn_beta
        self.block_sparse_moe = MoE(config, rngs=rngs)

    def __call__(self, h_BxLxD: jax.Array, *, ctx: dict, layer_cache=None, slope_H=None):
        """Returns (h, new layer cache, routing stats). `ctx` holds the per-call inputs shared by all layers
        (the MoE reads `expert_threshold_BxL` and its layer's slice of `routed_experts_BxLxNxK`, if present);
        `slope_H`: a lightning layer's decay rates when not those of `layer_idx` (a scanned group's layer).
        With `ctx["group"]` (a scanned group's index g), a softmax layer's `layer_cache` is the K/V stacks of
        every group `[G, B, S, K, D]`, read and written at group g in place (`SoftmaxAttention`), and expert
        weights held per group (`moe.PerGroup`) are group g's."""
        c = self.config
        x = rms_norm(h_BxLxD, self.input_layernorm[...], c.rms_norm_eps)
        if self.kind == LIGHTNING:
            a, new_cache = self.self_attn(x, valid_BxL=ctx["valid_BxL"], state_BxHxDxD=layer_cache, slope_H=slope_H)
        else:
            a, new_cache = self.self_attn(x, cos_BxLxR=ctx["cos"], sin_BxLxR=ctx["sin"], valid_BxL=ctx["valid_BxL"],
                                          kv_cache=layer_cache, cache_start=ctx.get("cache_start"),
                                          cache_valid_BxS=ctx.get("cache_valid_BxS"),
                                          cache_group=ctx.get("group") if layer_cache is not None else None)
        h = (x if c.postnorm else h_BxLxD) * self.alpha + a * self.beta
        x = rms_norm(h, self.post_attention_layernorm[...], c.rms_norm_eps)
        replay = ctx.get("routed_experts_BxLxNxK")
        if replay is not None:  # this layer's slice (a scanned group's layer: offset g·P + its position p)
            replay = jax.lax.dynamic_index_in_dim(replay, ctx.get("layer_offset", 0) + self.layer_idx, axis=2,
                                                  keepdims=False)
        m, stats = self.block_sparse_moe(x, valid_BxL=ctx["valid_BxL"], impl=ctx.get("moe_impl"),
                                         threshold_BxL=ctx.get("expert_threshold_BxL"), experts_BxLxK=replay,
                                         group=ctx.get("group"))
        h = (x if c.postnorm else h) * c.mlp_alpha + m * c.mlp_beta
        return h, new_cache, stats
