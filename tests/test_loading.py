"""from_pretrained: both layouts, zero-based out-of-order shards, and one clear message for every mismatch."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from m1jax.convert.hf_checkpoint import CheckpointError
from m1jax.convert.hf_layout import expected_tensors
from m1jax.convert.safetensors_io import SafetensorsFile, write_safetensors

from m1jax.config import ModelConfig
from m1jax.loading import from_pretrained


@pytest.fixture()
def config():
    return ModelConfig.from_preset("tiny")


def write_checkpoint(path, config, tensors, shards=1):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    names = sorted(tensors, key=lambda n: hash(n) % 97)
    if shards == 1:
        write_safetensors(path / "model.safetensors", tensors)
        return path
    weight_map = {}
    for s in range(shards):
        shard = f"model-{s:05d}-of-{shards:05d}.safetensors"  # zero-based, like the real repo
        part = names[s::shards]
        write_safetensors(path / shard, {n: tensors[n] for n in part})
        weight_map.update(dict.fromkeys(part, shard))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def random_tensors(config, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {n: (0.05 * rng.standard_normal(s)).astype(dtype) for n, s in expected_tensors(config).items()}


def test_zero_based_shards_and_ignored_buffers(tmp_path, config):
    tensors = random_tensors(config)
    tensors["model.layers.0.self_attn.slope_rate"] = np.zeros((6, 1, 1), np.float32)  # transformers buffer
    path = write_checkpoint(tmp_path / "ckpt", config, tensors, shards=5)
    model = from_pretrained(path, dtype=jnp.float32)  # JAX dtypes are taken as well as strings
    assert model.config.dtype == "float32"
    np.testing.assert_array_equal(np.asarray(model.layer(2).block_sparse_moe.w2[...][1]),
                                  tensors["model.layers.2.block_sparse_moe.experts.1.w2.weight"].T)
    np.testing.assert_array_equal(np.asarray(model.lm_head[...]), tensors["lm_head.weight"].T)
    qkv = tensors["model.layers.0.self_attn.qkv_proj.weight"]  # rows: head h -> [q_h | k_h | v_h]
    np.testing.assert_array_equal(np.asarray(model.layer(0).self_attn.qkv_proj[...][:, 1, 16:32]), qkv[64:80].T)


def test_router_stays_fp32_in_a_bf16_model(tmp_path, config):
    import ml_dtypes

    tensors = random_tensors(config, dtype=ml_dtypes.bfloat16)
    for n in tensors:
        if n.endswith("block_sparse_moe.gate.weight"):
            tensors[n] = tensors[n].astype(np.float32)
    model = from_pretrained(write_checkpoint(tmp_path / "ckpt", config, tensors))
    assert model.config.dtype == "bfloat16"
    assert model.layer(0).block_sparse_moe.gate[...].dtype == np.float32
    assert model.layer(0).block_sparse_moe.w1[...].dtype == ml_dtypes.bfloat16


def test_every_problem_is_listed_at_once(tmp_path, config):
    tensors = random_tensors(config)
    del tensors["model.layers.1.self_attn.out_proj.weight"]
    del tensors["model.layers.3.block_sparse_moe.experts.2.w3.weight"]
    tensors["model.layers.9.bogus.weight"] = np.zeros(3, np.float32)
    tensors["model.norm.weight"] = np.zeros(65, np.float32)
    tensors["model.layers.0.input_layernorm.weight"] = np.zeros(64, np.int32)
    path = write_checkpoint(tmp_path / "ckpt", config, tensors, shards=3)
    with pytest.raises(CheckpointError) as err:
        from_pretrained(path)
    msg = str(err.value)
    for fragment in ("5 problems", "missing tensor 'model.layers.1.self_attn.out_proj.weight'",
                     "missing tensor 'model.layers.3.block_sparse_moe.experts.2.w3.weight'",
                     "unexpected tensor 'model.layers.9.bogus.weight'", "'model.norm.weight'", "shape [65]",
                     "dtype I32"):
        assert fragment in msg, fragment


def test_truncated_and_missing_shards_are_named(tmp_path, config):
    path = write_checkpoint(tmp_path / "ckpt", config, random_tensors(config), shards=3)
    shard = path / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        from_pretrained(path)
    msg = str(err.value)
    assert "model-00001-of-00003.safetensors: truncated" in msg
    assert "model-00002-of-00003.safetensors: file not found" in msg


def test_config_weights_disagreement(tmp_path, config):
    path = write_checkpoint(tmp_path / "ckpt", config.replace(num_local_experts=3), random_tensors(config))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.block_sparse_moe.experts.3"):
        from_pretrained(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        from_pretrained(tmp_path / "absent")
    (tmp_path / "config.json").write_text(json.dumps(ModelConfig.from_preset("tiny").to_hf_dict()))
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json and no model.safetensors"):
        from_pretrained(tmp_path)


def test_safetensors_writer_is_readable_by_the_reference_library(tmp_path):
    from safetensors.numpy import load_file

    a = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.ones(4, np.int64)}
    write_safetensors(tmp_path / "a.safetensors", a)
    back = load_file(str(tmp_path / "a.safetensors"))
    for k in a:
        np.testing.assert_array_equal(back[k], a[k])
    assert SafetensorsFile(tmp_path / "a.safetensors").get("x").flags.writeable is False
