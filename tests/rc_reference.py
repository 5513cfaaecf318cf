"""An independent float64 numpy reference of MiniMax-M1's remote-code (RC) forward pass, written from the spec
(../shared/spec/minimax_m1_spec.md §3–§6), for what transformers cannot check: partial RoPE (`rotary_dim <
head_dim`, which transformers ignores) and non-power-of-two head counts (transformers' slopes differ).
It reads the ORIGINAL checkpoint tensor names and the remote-code config dict; it imports nothing from m1jax.
Lightning attention is the token-by-token recurrence (the blocked form is not used here)."""

from __future__ import annotations

import math

import numpy as np


def _slopes(n):
    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return pow2(n)
    c = 2 ** math.floor(math.log2(n))
    return pow2(c) + _slopes(2 * c)[0::2][: n - c]


def _rms(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps))


def _silu(x):
    return x / (1 + np.exp(-x))


def rc_forward(cfg: dict, w: dict, tokens: np.ndarray) -> np.ndarray:
    """Logits [B, T, V] (float64) of the RC model for `tokens` [B, T]; `w` maps HF names to arrays."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    L, H, KV, D = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    R = cfg.get("rotary_dim", D)
    E, K = cfg["num_local_experts"], cfg["num_experts_per_tok"]
    eps = cfg["rms_norm_eps"]
    b, t = tokens.shape
    h = w["model.embed_tokens.weight"][tokens]
    pos = np.arange(t, dtype=np.float64)
    inv = 1.0 / (cfg["rope_theta"] ** (np.arange(0, R, 2) / R))
    ang = np.concatenate([pos[:, None] * inv, pos[:, None] * inv], -1)  # [T, R]
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]

    def rope(z):  # z [B, T, heads, D]
        zr, zp = z[..., :R], z[..., R:]
        rot = np.concatenate([-zr[..., R // 2:], zr[..., : R // 2]], -1)
        return np.concatenate([zr * cos + rot * sin, zp], -1)

    for l in range(L):
        p = f"model.layers.{l}"
        x = _rms(h, w[f"{p}.input_layernorm.weight"], eps)
        if cfg["attn_type_list"][l] == 0:
            qkv = _silu(x @ w[f"{p}.self_attn.qkv_proj.weight"].T).reshape(b, t, H, 3 * D)
            q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
            s = np.asarray(_slopes(H)) * (1 - l / (L - 1) + 1e-5)
            lam = np.exp(-s)[None, :, None, None]
            S = np.zeros((b, H, D, D))
            o = np.zeros((b, t, H, D))
            for i in range(t):
                S = lam * S + np.einsum("bhd,bhe->bhde", k[:, i], v[:, i])
                o[:, i] = np.einsum("bhd,bhde->bhe", q[:, i], S)
            o = _rms(o.reshape(b, t, H * D), w[f"{p}.self_attn.norm.weight"], 1e-6)
            o = o / (1 + np.exp(-(x @ w[f"{p}.self_attn.output_gate.weight"].T)))
            a = o @ w[f"{p}.self_attn.out_proj.weight"].T
            alpha, beta = cfg["layernorm_linear_attention_alpha"], cfg["layernorm_linear_attention_beta"]
        else:
            q = rope((x @ w[f"{p}.self_attn.q_proj.weight"].T).reshape(b, t, H, D))
            k = rope((x @ w[f"{p}.self_attn.k_proj.weight"].T).reshape(b, t, KV, D))
            v = (x @ w[f"{p}.self_attn.v_proj.weight"].T).reshape(b, t, KV, D)
            k, v = np.repeat(k, H // KV, axis=2), np.repeat(v, H // KV, axis=2)
            sc = np.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
            sc = np.where(np.tril(np.ones((t, t), bool)), sc, -np.inf)
            pr = np.exp(sc - sc.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            a = np.einsum("bhij,bjhd->bihd", pr, v).reshape(b, t, H * D) @ w[f"{p}.self_attn.o_proj.weight"].T
            alpha, beta = cfg["layernorm_full_attention_alpha"], cfg["layernorm_full_attention_beta"]
        h = (x if cfg.get("postnorm") else h) * alpha + a * beta
        x = _rms(h, w[f"{p}.post_attention_layernorm.weight"], eps)
        xt = x.reshape(b * t, -1)
        logits = xt @ w[f"{p}.block_sparse_moe.gate.weight"].T
        pr = np.exp(logits - logits.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        top = np.argsort(-pr, axis=-1, kind="stable")[:, :K]
        wt = np.take_along_axis(pr, top, -1)
        wt /= wt.sum(-1, keepdims=True)
        y = np.zeros_like(xt)
        for e in range(E):
            q_ = f"{p}.block_sparse_moe.experts.{e}"
            ffn = (_silu(xt @ w[f"{q_}.w1.weight"].T) * (xt @ w[f"{q_}.w3.weight"].T)) @ w[f"{q_}.w2.weight"].T
            y += ((top == e) * wt).sum(-1, keepdims=True) * ffn
        h = (x if cfg.get("postnorm") else h) * cfg["layernorm_mlp_alpha"] + y.reshape(b, t, -1) * cfg[
            "layernorm_mlp_beta"]
    h = _rms(h, w["model.norm.weight"], eps)
    return h @ w["lm_head.weight"].T
