"""Test helpers around the PyTorch oracle: transformers' `MiniMaxForCausalLM` with random weights, saved as
an HF checkpoint in either layout. Test-only (the library imports torch and transformers only in
`m1jax.hf_reference`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from m1jax.convert.safetensors_io import write_safetensors
from transformers import MiniMaxForCausalLM

from m1jax.config import ModelConfig
from m1jax.hf_reference import new_transformers_model


def make_hf_model(config: ModelConfig, seed: int = 0, *, rc_slopes: bool = True, std: float = 0.08
                  ) -> MiniMaxForCausalLM:
    """A random fp32 transformers model; norms perturbed so that they matter; RC slopes patched in if asked."""
    torch.manual_seed(seed)
    model = new_transformers_model(config.replace(initializer_range=std), rc_slopes=rc_slopes)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def save_original_layout(model: MiniMaxForCausalLM, config: ModelConfig, out: Path, *,
                         shards: int = 1, spelling: str = "remote_code") -> Path:
    """Write the model as the published repos do: `block_sparse_moe.experts.E.w1/w2/w3`, config in `spelling`."""
    out.mkdir(parents=True, exist_ok=True)
    f = config.intermediate_size
    tensors: dict[str, np.ndarray] = {}
    for name, t in model.state_dict().items():
        a = t.detach().numpy()
        if name.endswith(("slope_rate", "query_decay", "key_decay", "diagonal_decay")):
            continue
        if ".mlp.experts.gate_up_proj" in name:
            prefix = name.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts")
            for e in range(a.shape[0]):
                tensors[f"{prefix}.{e}.w1.weight"] = a[e, :f]
                tensors[f"{prefix}.{e}.w3.weight"] = a[e, f:]
        elif ".mlp.experts.down_proj" in name:
            prefix = name.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts")
            for e in range(a.shape[0]):
                tensors[f"{prefix}.{e}.w2.weight"] = a[e]
        elif ".mlp.gate.weight" in name:
            tensors[name.replace(".mlp.gate", ".block_sparse_moe.gate")] = a
        else:
            tensors[name] = a
    _write(tensors, out, shards)
    _write_config(config, out, spelling)
    return out


def save_transformers_layout(model: MiniMaxForCausalLM, config: ModelConfig, out: Path, *, shards: int = 1) -> Path:
    """Write the in-memory transformers-native state dict (fused `gate_up_proj`, decay buffers included)."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().numpy() for name, t in model.state_dict().items()}
    _write(tensors, out, shards)
    _write_config(config, out, "transformers")
    return out


def _write_config(config: ModelConfig, out: Path, spelling: str):
    cfg = config.replace(hf_spelling=spelling, hf_source_json="{}")
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))


def _write(tensors: dict[str, np.ndarray], out: Path, shards: int):
    names = list(tensors)
    if shards == 1:
        write_safetensors(out / "model.safetensors", tensors)
        return
    rng = np.random.default_rng(0)
    rng.shuffle(names)  # tensors out of layer order, like the real repo
    weight_map = {}
    for s in range(shards):
        shard = f"model-{s:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        write_safetensors(out / shard, {n: tensors[n] for n in part})
        weight_map.update({n: shard for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
