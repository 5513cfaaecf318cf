"""Test helpers around `m1jax.convert.synthetic`: the real MiniMax-M1 layout at tiny width, small checkpoints of any
config, and surgery on written shards (drop / add / replace a tensor) for the bad-input tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from m1jax.convert.safetensors_io import SafetensorsFile, write_safetensors
from m1jax.convert.synthetic import tiny_m1_config, write_checkpoint

INDEX = "model.safetensors.index.json"


def real_m1(fixtures_dir: Path) -> tuple[dict, dict[str, str]]:
    """(real config.json dict, real weight_map) of MiniMax-M1 from the shared fixtures."""
    folder = fixtures_dir / "minimax-m1"
    config = json.loads((folder / "config.json").read_text())
    weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    return config, weight_map


def write_m1_layout(path: Path, fixtures_dir: Path, seed: int = 0) -> Path:
    """The 413-shard, 8,243-tensor MiniMax-M1 checkpoint at tiny width (a few MB), following the real index."""
    config, weight_map = real_m1(fixtures_dir)
    return write_checkpoint(path, tiny_m1_config(config), weight_map=weight_map, seed=seed)


def write_small(path: Path, config_dict: dict, *, shard_bytes: int = 40_000, seed: int = 0) -> Path:
    return write_checkpoint(path, config_dict, shard_bytes=shard_bytes, seed=seed)


def read_index(path: Path) -> dict:
    return json.loads((path / INDEX).read_text())


def edit_tensor(path: Path, name: str, value: np.ndarray | None) -> str:
    """Replace (or, with None, delete) tensor `name` in its shard and the index; return the shard's name."""
    index = read_index(path)
    shard = index["weight_map"][name]
    f = SafetensorsFile(path / shard)
    tensors = {n: np.array(f.get(n)) for n in f.keys()}
    del f
    if value is None:
        del tensors[name]
        del index["weight_map"][name]
    else:
        tensors[name] = value
    write_safetensors(path / shard, tensors, {"format": "pt"}, durable=False)
    (path / INDEX).write_text(json.dumps(index))
    return shard


def add_tensor(path: Path, name: str, value: np.ndarray, shard: str | None = None) -> str:
    """Add tensor `name` to `shard` (default: the first) and to the index; return the shard's name."""
    index = read_index(path)
    shard = shard or sorted(set(index["weight_map"].values()))[0]
    f = SafetensorsFile(path / shard)
    tensors = {n: np.array(f.get(n)) for n in f.keys()}
    del f
    tensors[name] = value
    index["weight_map"][name] = shard
    write_safetensors(path / shard, tensors, {"format": "pt"}, durable=False)
    (path / INDEX).write_text(json.dumps(index))
    return shard
