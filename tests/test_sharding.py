"""The same model under 8-device CPU meshes of different shapes computes what it computes on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from m1jax.config import ModelConfig
from m1jax.loading import build_from_views
from m1jax.model import MiniMaxM1
from m1jax.sharding import RULES, logical_to_spec, make_mesh


@pytest.fixture(scope="module")
def reference():
    config = ModelConfig.from_preset("tiny").replace(num_attention_heads=8, num_key_value_heads=4,
                                                     num_local_experts=8, vocab_size=512)
    model = MiniMaxM1(config, rngs=nnx.Rngs(3))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (8, 24)))
    logits = jax.jit(lambda t: model(t).logits)(tokens)
    return config, model, tokens, np.asarray(logits)


@pytest.mark.parametrize("mesh_shape", [{"data": 2, "tensor": 4}, {"fsdp": 2, "tensor": 2, "expert": 2},
                                        {"data": 8}])
def test_sharded_forward_equals_single_device(reference, mesh_shape):
    assert jax.device_count() == 8
    config, model, tokens, expected = reference
    mesh = make_mesh(mesh_shape)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    views = {path: np.asarray(var.get_value()) for path, var in flat.items()}
    sharded = build_from_views(config, views, mesh=mesh)
    w1 = sharded.layer(0).block_sparse_moe.w1[...]
    if mesh_shape.get("expert", 1) > 1:
        assert "expert" in w1.sharding.spec[0]
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda t: sharded(t).logits)(tokens)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=2e-5, atol=2e-5)


def test_rules_table_skips_axes_that_do_not_divide():
    mesh = make_mesh({"data": 2, "tensor": 4})
    assert logical_to_spec(("embed", "heads", "head_dim"), (64, 8, 16), mesh) == P(None, "tensor", None)
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == P(None, None, None)
    assert logical_to_spec(("batch", None), (6, 3), mesh) == P("data", None)
    with pytest.raises(KeyError, match="unknown_axis"):
        logical_to_spec(("unknown_axis",), (4,), mesh)
    assert set(RULES) >= {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "experts"}


def test_bad_mesh_is_named():
    with pytest.raises(ValueError, match="needs 3 devices"):
        make_mesh({"data": 3})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        make_mesh({"model": 8})


def test_pallas_lightning_runs_per_shard_under_a_mesh():
    """XLA cannot partition a Pallas call: under a mesh the lightning layer runs it with shard_map over batch and
    heads (interpret mode here) and still computes the single-device result."""
    config = ModelConfig.from_preset("tiny").replace(num_attention_heads=8, num_key_value_heads=4,
                                                     lightning_impl="pallas", num_hidden_layers=2,
                                                     layer_types=("linear_attention", "full_attention"))
    model = MiniMaxM1(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (4, 12)))
    expected = np.asarray(jax.jit(lambda t: model(t).logits)(tokens))
    mesh = make_mesh({"data": 2, "tensor": 4})
    views = {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model))}
    sharded = build_from_views(config, views, mesh=mesh)
    with jax.set_mesh(mesh):
        fwd = jax.jit(lambda t: sharded(t).logits)
        assert "shard_map" in fwd.lower(tokens).as_text() or "sdy.manual_computation" in fwd.lower(tokens).as_text()
        logits = fwd(tokens)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=2e-5, atol=2e-5)
