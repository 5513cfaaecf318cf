"""LoRA adapters (m1jax.lora): the adapted model starts equal to its base, merging equals the adapted forward,
only adapters get gradients, scanned layers and int8 experts work, adapters shard like their weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1jax import lora
from m1jax.config import ConfigError, ModelConfig
from m1jax.loading import build_from_views
from m1jax.model import MiniMaxM1
from m1jax.quantize import quantize_views
from m1jax.sharding import make_mesh


def small(pattern: str = "LLSLLS", **kw) -> ModelConfig:
    types = tuple("full_attention" if k == "S" else "linear_attention" for k in pattern)
    return ModelConfig.from_preset("tiny-hf").replace(num_hidden_layers=len(types), layer_types=types, block_size=8,
                                                      hf_source_json="{}", **kw)


def randomized(model, scale=0.05, seed=3):
    """`model` with random (nonzero) adapters."""
    ad = lora.adapter_state(model)
    leaves, treedef = jax.tree.flatten(ad)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return lora.set_adapters(model, jax.tree.unflatten(treedef, new))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 500, (2, 13)))


@nnx.jit
def logits(model, tokens=TOKENS):
    """The model's logits for `tokens`, compiled (an eager forward dispatches every op of every layer)."""
    return model(tokens).logits


@pytest.fixture(scope="module")
def base():
    return MiniMaxM1(small(scan_layers=False), rngs=nnx.Rngs(0))


def test_adapters_start_at_zero_and_cover_the_targets(base):
    m = lora.attach(base, rank=4, seed=1)
    np.testing.assert_array_equal(logits(m), logits(base))
    names = {p[-1] for p, _ in nnx.to_flat_state(lora.adapter_state(m))}
    assert {"qkv_proj_lora_a", "out_proj_lora_b", "q_proj_lora_a", "o_proj_lora_b", "w1_lora_a", "w2_lora_b"} <= names
    only_attention = lora.attach(base, rank=2, targets=("attention",))
    names = {p[-1] for p, _ in nnx.to_flat_state(lora.adapter_state(only_attention))}
    assert names and not any(n.startswith("w") for n in names)
    a = m.layers[0].block_sparse_moe.w1_lora_a
    assert a.shape == (base.config.num_local_experts, base.config.hidden_size, 4)  # one adapter per expert
    assert a.get_metadata()["logical_axes"][0] == "experts"


def test_merge_equals_the_adapted_forward(base):
    m = randomized(lora.attach(base, rank=4, alpha=8.0))
    out = logits(m)
    assert rel(out, logits(base)) > 1e-3  # the adapters change the model
    merged = lora.merge(m)
    assert merged.config.lora_rank == 0
    assert {p for p, _ in nnx.to_flat_state(nnx.state(merged))} == {p for p, _ in nnx.to_flat_state(nnx.state(base))}
    assert rel(logits(merged), out) < 1e-6


def test_only_adapters_get_gradients_and_b_alone_at_init(base):
    m = lora.attach(base, rank=4, seed=1)
    graphdef, adapters, frozen = nnx.split(m, lora.LoRAParam, ...)

    @jax.jit
    def grad(ad):
        return jax.grad(lambda ad: jnp.sum(nnx.merge(graphdef, ad, frozen)(TOKENS).logits[:, -1] ** 2) * 1e-3)(ad)

    grads = grad(adapters)
    flat = {p[-1]: np.abs(np.asarray(g.get_value())).max() for p, g in nnx.to_flat_state(grads)}
    assert all(v == 0 for k, v in flat.items() if k.endswith("_lora_a"))  # ∂/∂A = 0 while B = 0
    assert all(v > 0 for k, v in flat.items() if k.endswith("_lora_b"))


@pytest.mark.slow  # a scanned model's compiles (~20 s); the unrolled adapters are tested by default
def test_scanned_model_adapters_are_stacked_and_merge(base):
    scanned = MiniMaxM1(small(scan_layers=True), rngs=nnx.Rngs(0))
    m = randomized(lora.attach(scanned, rank=2))
    a = m.stacked_layers[0].block_sparse_moe.w1_lora_a
    assert a.shape[0] == scanned.config.scan_groups and a.get_metadata()["logical_axes"][0] == "layers"
    assert rel(logits(lora.merge(m)), logits(m)) < 1e-6
    def loss(m, ad):
        return jnp.sum(lora.set_adapters(m, ad)(TOKENS).logits[:, -1] ** 2)

    grads = nnx.jit(lambda m, ad: jax.grad(loss, argnums=1)(m, ad))(m, lora.adapter_state(m))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_int8_experts_keep_int8_and_adapters_add_on_top(base):
    flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(base, nnx.Param))}
    q = build_from_views(base.config.replace(quantize="int8-experts"), quantize_views(flat))
    m = lora.attach(q, rank=4)
    assert m.layers[0].block_sparse_moe.w1.get_value().dtype == jnp.int8
    assert rel(logits(m), logits(q)) < 1e-5  # dequantized + 0 vs the int8 product
    with pytest.raises(ValueError, match="int8"):
        lora.merge(randomized(m))


@pytest.mark.slow  # a mesh of 8 CPU devices (~15 s)
def test_adapters_are_created_in_the_weights_sharding():
    mesh = make_mesh({"expert": 2, "tensor": 2}, jax.devices()[:4])
    from m1jax.loading import init_sharded

    model = init_sharded(small(scan_layers=False, num_local_experts=4), mesh)
    m = lora.attach(model, rank=2)
    a, w = m.layers[0].block_sparse_moe.w1_lora_a.get_value(), m.layers[0].block_sparse_moe.w1.get_value()
    assert a.sharding.spec[0] == w.sharding.spec[0] and a.sharding.spec[0] is not None
    with jax.set_mesh(mesh):
        out = logits(m)
    np.testing.assert_allclose(out, logits(model), rtol=1e-5, atol=1e-5)


def test_bad_lora_settings_name_the_field():
    with pytest.raises(ConfigError, match="lora_rank"):
        ModelConfig.from_preset("tiny", lora_rank=-1)
    with pytest.raises(ConfigError, match="lora_targets"):
        ModelConfig.from_preset("tiny", lora_targets=("mlp",))
    with pytest.raises(ValueError, match="rank"):
        lora.attach(MiniMaxM1(small(scan_layers=False), rngs=nnx.Rngs(0)), rank=0)
