"""transformers' `MiniMaxForCausalLM` (PyTorch, CPU, fp32) holding an m1jax model's weights: the independent
reference of `m1jax verify --reference transformers` and of the tests. Imports torch and transformers, which the
rest of the library never does.

transformers agrees with the remote code (RC) when `rotary_dim == head_dim` (it ignores a partial rotary) and the
head count is a power of two; its per-layer slope factor puts RC's `+1e-5` inside the denominator, so the model
built here has RC's factor patched in (`rc_slope_rate`).
"""

from __future__ import annotations

import numpy as np

from m1jax.config import ModelConfig


def hf_config(config: ModelConfig):
    """transformers' `MiniMaxConfig` for an m1jax config (no bos/eos/pad ids: the reference only runs forwards)."""
    from transformers import MiniMaxConfig

    d = config.replace(hf_spelling="transformers", hf_source_json="{}").to_hf_dict()
    d.pop("rotary_dim", None)
    d.pop("postnorm", None)
    d.update(pad_token_id=None, bos_token_id=None, eos_token_id=None)
    return MiniMaxConfig(**d)


def rc_slope_rate(self, device=None):
    """RC's per-layer slope factor 1 − l/(L−1) + 1e-5 (transformers puts the 1e-5 inside the denominator)."""
    import torch

    base = 1 / (2 ** (8 / self.num_attention_heads))
    rate = base ** (torch.arange(self.num_attention_heads, device=device) + 1)
    factor = 1 - self.layer_idx / (self.num_hidden_layers - 1) + 1e-5
    return (rate * factor)[:, None, None]


def reference_mismatches(config: ModelConfig) -> list[str]:
    """Why transformers cannot reproduce this config (empty when it can)."""
    problems = []
    if config.rope_dim != config.head_dim:
        problems.append(f"partial rotary ({config.rope_dim} of {config.head_dim} dims): transformers rotates all")
    h = config.num_attention_heads
    if h & (h - 1):
        problems.append(f"{h} heads (not a power of two): transformers' ALiBi slopes differ from RC's")
    if not config.postnorm:
        problems.append("postnorm=False: transformers always adds the normed input")
    return problems


def new_transformers_model(config: ModelConfig, *, rc_slopes: bool = True):
    """A randomly initialised fp32 `MiniMaxForCausalLM` for `config`, with RC's slopes if `rc_slopes`."""
    from transformers import MiniMaxForCausalLM
    from transformers.models.minimax import modeling_minimax

    cfg = hf_config(config)
    original = modeling_minimax.MiniMaxLightningAttention.get_slope_rate
    if rc_slopes:
        modeling_minimax.MiniMaxLightningAttention.get_slope_rate = rc_slope_rate
    try:
        return MiniMaxForCausalLM(cfg).eval()
    finally:
        modeling_minimax.MiniMaxLightningAttention.get_slope_rate = original


def transformers_state_dict(tensors) -> dict:
    """Original-layout `(name, array)` pairs → transformers' native state dict (experts fused: `gate_up_proj`
    `[E, 2F, D]` with the w1 rows first, `down_proj` `[E, D, F]`; `block_sparse_moe` → `mlp`)."""
    import torch

    out, experts = {}, {}
    for name, a in tensors:
        if ".block_sparse_moe.experts." in name:
            prefix, rest = name.split(".block_sparse_moe.experts.")
            e, w = rest.split(".")[:2]
            experts.setdefault(prefix, {}).setdefault(w, {})[int(e)] = np.asarray(a, np.float32)
        elif ".block_sparse_moe.gate." in name:
            out[name.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = torch.tensor(np.asarray(a, np.float32))
        else:
            out[name] = torch.tensor(np.asarray(a, np.float32))
    for prefix, ws in experts.items():
        n = len(ws["w1"])
        gate_up = np.stack([np.concatenate([ws["w1"][e], ws["w3"][e]], axis=0) for e in range(n)])
        out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.tensor(gate_up)
        out[f"{prefix}.mlp.experts.down_proj"] = torch.tensor(np.stack([ws["w2"][e] for e in range(n)]))
    return out


def transformers_model(model):
    """`MiniMaxForCausalLM` (fp32, CPU, RC slopes) holding the weights of the m1jax `model`.

    Raises ValueError naming what transformers cannot reproduce (`reference_mismatches`) or any weight that
    does not fit.
    """
    from m1jax.convert.m1jax_to_hf import model_hf_tensors

    problems = reference_mismatches(model.config)
    if problems:
        raise ValueError("transformers cannot serve as the reference for this model: " + "; ".join(problems))
    hf = new_transformers_model(model.config)
    state = transformers_state_dict(model_hf_tensors(model, dtype="float32"))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith(("slope_rate", "query_decay", "key_decay", "diagonal_decay",
                                                      "inv_freq"))]
    if missing or unexpected:
        raise ValueError(f"weights do not fit transformers' MiniMaxForCausalLM: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return hf
