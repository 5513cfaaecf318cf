"""Synthetic HF checkpoints with random weights, for conversion tests and benchmarks.

`write_checkpoint` writes an original-layout checkpoint for any config, either following a given weight map
name for name and shard for shard (e.g. the real 413-shard MiniMax-M1 index at tiny width) or cutting its own
shards. Weights are bf16 (router gates fp32, as in the published repos) from a fast bit-level generator, so
multi-GB checkpoints take seconds of CPU per GB.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from m1jax.convert.hf_layout import ORIGINAL, expected_tensors
from m1jax.convert.safetensors_io import DTYPES, write_safetensors

from m1jax.config import ModelConfig

INDEX = "model.safetensors.index.json"
TINY_M1 = {"hidden_size": 16, "head_dim": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 8, "vocab_size": 128, "rotary_dim": 4}


def random_bf16(rng: np.random.Generator, shape) -> np.ndarray:
    """Random bf16 values of either sign with magnitude in [2^-7, 2^-5) (never NaN/inf/zero), built from bits."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    bits = (bits & np.uint16(0x80FF)) | np.uint16(0x3C00)  # sign, exponent 120 or 121, 7 mantissa bits
    return bits.view(DTYPES["BF16"])


def tiny_m1_config(real_config: dict, **dims) -> dict:
    """The real MiniMax-M1 `config.json` dict with its widths replaced (`TINY_M1` unless given): the same
    80-layer pattern, 32 experts, names and spelling, a few MB of weights."""
    d = dict(real_config)
    d.update(TINY_M1)
    d.update(dims)
    return d


def tensor_specs(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF name → (shape, safetensors dtype) of an original-layout checkpoint (router gates F32, the rest BF16)."""
    return {name: (shape, "F32" if name.endswith("block_sparse_moe.gate.weight") else "BF16")
            for name, shape in expected_tensors(config, ORIGINAL).items()}


def make_tensor(rng: np.random.Generator, shape, dtype: str) -> np.ndarray:
    if dtype == "F32":
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)
    return random_bf16(rng, shape)


def own_weight_map(specs: dict, shard_bytes: int, seed: int) -> dict[str, str]:
    """Names shuffled (out of layer order, like the real repo) and cut into zero-based shards ≤ shard_bytes."""
    names = list(specs)
    np.random.default_rng(seed + 1).shuffle(names)
    groups, size = [[]], 0
    for name in names:
        shape, dtype = specs[name]
        nbytes = int(np.prod(shape)) * DTYPES[dtype].itemsize
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    n = len(groups)
    return {name: f"model-{i:05d}-of-{n:05d}.safetensors" for i, g in enumerate(groups) for name in g}


def write_checkpoint(path: str | os.PathLike, config_dict: dict, *, weight_map: dict[str, str] | None = None,
                     shard_bytes: int = 1 << 30, seed: int = 0, tokenizer: bool = True) -> Path:
    """Write a random original-layout checkpoint of `config_dict` to `path`; return the path.

    weight_map: name → shard file to follow exactly (it must name exactly the tensors the config implies);
    otherwise shards of about `shard_bytes` are cut from a shuffled name order. One shard is in memory at a time.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.from_hf_dict(config_dict)
    specs = tensor_specs(config)
    if weight_map is None:
        weight_map = own_weight_map(specs, shard_bytes, seed)
    elif set(weight_map) != set(specs):
        missing, extra = sorted(set(specs) - set(weight_map)), sorted(set(weight_map) - set(specs))
        raise ValueError(f"weight map does not match the config: {len(missing)} missing (e.g. {missing[:3]}), "
                         f"{len(extra)} extra (e.g. {extra[:3]})")
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, []).append(name)
    rng = np.random.default_rng(seed)
    total = 0
    for shard in sorted(shards):
        tensors = {name: make_tensor(rng, *specs[name]) for name in shards[shard]}
        total += sum(t.nbytes for t in tensors.values())
        write_safetensors(path / shard, tensors, {"format": "pt"}, durable=False)
        del tensors
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(config_dict, indent=2))
    if tokenizer:
        (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 40960000,
                                                                "tokenizer_class": "GPT2Tokenizer"}))
        (path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
        (path / "merges.txt").write_text("#version: 0.2\n")
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 200020}))
    return path
