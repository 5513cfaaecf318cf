"""Expert parallelism: the MoE in shard_map over 8 CPU devices equals the single-device MoE (values, gradients,
routing statistics, a whole model), and its compiled HLO never all-gathers an expert weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tpu_helpers import run_deviceless

from m1jax import hlo_collectives
from m1jax.config import ModelConfig
from m1jax.loading import build_from_views
from m1jax.model import MiniMaxM1
from m1jax.modules import moe
from m1jax.sharding import make_mesh, named_sharding
from m1jax.topology import libtpu_available

E, D, F, K = 8, 16, 24, 2
# mesh, then (batch, length) of tokens: prefill-sized (batch, or batch and sequence, split over every token axis:
# tokens exchanged), decode-sized, and batches the axes do not divide (tokens replicated over, or gathered onto,
# the expert shards)
CASES = [({"expert": 8}, [(8, 12), (3, 1)]), ({"data": 2, "expert": 4}, [(16, 1), (2, 5), (2, 8)]),
         ({"tensor": 2, "expert": 4}, [(4, 6), (1, 1)]), ({"fsdp": 2, "expert": 2, "tensor": 2}, [(8, 3), (2, 5)])]


def expert_weights(seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (0.3 * jax.random.normal(ks[0], (D, E)), 0.2 * jax.random.normal(ks[1], (E, D, F)),
            0.2 * jax.random.normal(ks[2], (E, D, F)), 0.2 * jax.random.normal(ks[3], (E, F, D)))


def routed(x_BxLxD, gate):
    b, l, _ = x_BxLxD.shape
    _, wts, idx = moe.route(x_BxLxD.reshape(-1, D), gate, K)
    return wts.reshape(b, l, K), idx.reshape(b, l, K)


@pytest.mark.parametrize("mesh_shape, tokens", CASES, ids=lambda c: ",".join(f"{k}{v}" for k, v in c.items())
                         if isinstance(c, dict) else "")
def test_expert_parallel_equals_single_device(mesh_shape, tokens):
    gate, w1, w3, w2 = expert_weights()
    mesh = make_mesh(mesh_shape)
    for b, l in tokens:
        x = jax.random.normal(jax.random.PRNGKey(b * 100 + l), (b, l, D))
        wts, idx = routed(x, gate)
        expected = moe.experts_dense(x.reshape(-1, D), w1, w3, w2, wts.reshape(-1, K), idx.reshape(-1, K))
        with jax.set_mesh(mesh):
            got = jax.jit(moe.expert_parallel)(x, w1, w3, w2, wts, idx)
        np.testing.assert_allclose(np.asarray(got).reshape(-1, D), expected, rtol=1e-5, atol=1e-6,
                                   err_msg=f"mesh {mesh_shape}, tokens {b}x{l}")


def test_exchange_is_exact_under_skewed_routing():
    """Every token routed to the experts of one shard: that shard's receive buffer is full (the worst case)."""
    _, w1, w3, w2 = expert_weights(1)
    x = jax.random.normal(jax.random.PRNGKey(5), (8, 6, D))
    idx = jnp.broadcast_to(jnp.array([3, 2]), (8, 6, K)).astype(jnp.int32)
    wts = jnp.full((8, 6, K), 0.5)
    expected = moe.experts_dense(x.reshape(-1, D), w1, w3, w2, wts.reshape(-1, K), idx.reshape(-1, K))
    with jax.set_mesh(make_mesh({"data": 2, "expert": 4})):
        got = jax.jit(moe.expert_parallel)(x, w1, w3, w2, wts, idx)
    np.testing.assert_allclose(np.asarray(got).reshape(-1, D), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mesh_shape, tokens", [({"fsdp": 2, "expert": 2, "tensor": 2}, (8, 6)),
                                                ({"tensor": 2, "expert": 4}, (3, 2)),
                                                ({"data": 2, "tensor": 4}, (4, 6))])
def test_expert_parallel_gradients_equal_single_device(mesh_shape, tokens):
    gate, w1, w3, w2 = expert_weights(2)
    x = jax.random.normal(jax.random.PRNGKey(7), (*tokens, D))

    def loss(fn, x, gate, w1, w3, w2):
        wts, idx = routed(x, gate)
        return jnp.sum(jnp.sin(fn(x, w1, w3, w2, wts, idx).reshape(x.shape)))

    def single(x, w1, w3, w2, wts, idx):
        return moe.experts_dense(x.reshape(-1, D), w1, w3, w2, wts.reshape(-1, K), idx.reshape(-1, K))

    args = (x, gate, w1, w3, w2)
    expected = jax.grad(lambda *a: loss(single, *a), argnums=tuple(range(5)))(*args)
    with jax.set_mesh(make_mesh(mesh_shape)):
        got = jax.jit(jax.grad(lambda *a: loss(moe.expert_parallel, *a), argnums=tuple(range(5))))(*args)
    for name, g, g_ref in zip(("x", "gate", "w1", "w3", "w2"), got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(g), g_ref, rtol=1e-4, atol=1e-6, err_msg=name)


def tiny_config(**kw):
    return ModelConfig.from_preset("tiny").replace(num_attention_heads=8, num_key_value_heads=4,
                                                   num_local_experts=E, vocab_size=512, **kw)


def test_moe_module_under_mesh_equals_unsharded_with_valid_mask():
    """The MoE layer picks expert parallelism under the mesh by itself; output and routing statistics (over
    valid tokens only) are those of the single-device layer."""
    config = tiny_config()
    layer = moe.MoE(config, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.PRNGKey(3), (8, 5, config.hidden_size))
    valid = jnp.arange(5)[None, :] < jnp.array([5, 3, 1, 5, 4, 2, 5, 5])[:, None]
    fwd = jax.jit(lambda x, v: layer(x, valid_BxL=v))
    y_ref, stats_ref = fwd(x, valid)
    with jax.set_mesh(make_mesh({"data": 2, "expert": 4})):
        lowered = fwd.lower(x, valid)
        y, stats = lowered.compile()(x, valid)
    assert "all_to_all" in lowered.as_text() and "ragged_all_to_all" not in lowered.as_text()  # CPU stand-in
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-6)
    for key in stats_ref:
        np.testing.assert_allclose(np.asarray(stats[key]), stats_ref[key], rtol=1e-6, err_msg=key)


def test_tiny_model_forward_under_mesh_equals_unsharded():
    """(tests/test_sharding.py runs the model under fsdp × tensor × expert meshes too.)"""
    mesh_shape = {"expert": 8}
    config = tiny_config()
    model = MiniMaxM1(config, rngs=nnx.Rngs(3))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (8, 12)))
    expected = np.asarray(jax.jit(lambda t: model(t).logits)(tokens))
    mesh = make_mesh(mesh_shape)
    views = {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model))}
    sharded = build_from_views(config, views, mesh=mesh)
    graphdef, state = nnx.split(sharded)
    with jax.set_mesh(mesh):
        compiled = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits).lower(state, tokens).compile()
        logits = compiled(state, tokens)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=2e-5, atol=2e-5)
    shapes = [(E, config.hidden_size, config.intermediate_size), (E, config.intermediate_size, config.hidden_size)]
    assert hlo_collectives.all_gathers_of(compiled.as_text(), shapes) == []


def test_no_expert_weight_is_all_gathered():
    """In the compiled HLO, no all-gather produces an expert weight or a piece of one — while GSPMD partitioning
    the single-device MoE (moe_parallel="off", tiles) does gather them, which shows the check can fail."""
    mesh = make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
    d, f = 32, 48  # shapes no activation here shares
    shapes = [(E, d, f), (E, f, d)]
    texts = {}
    for parallel in ("auto", "off"):
        config = tiny_config(hidden_size=d, intermediate_size=f, moe_parallel=parallel, moe_impl="tiled")
        graphdef, state = nnx.split(moe.MoE(config, rngs=nnx.Rngs(0)))
        state = jax.tree.map(lambda v: v.replace(jax.device_put(v.get_value(), named_sharding(
            v.get_metadata()["logical_axes"], v.shape, mesh))), state, is_leaf=lambda v: isinstance(v, nnx.Variable))
        with jax.set_mesh(mesh):
            forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])  # noqa: B023
            texts[parallel] = forward.lower(state, jnp.ones((8, 4, d))).compile().as_text()
    assert hlo_collectives.all_gathers_of(texts["auto"], shapes) == []
    assert len(hlo_collectives.all_gathers_of(texts["off"], shapes)) == 3


TPU_SCRIPT = """
import json, sys
from benchmarks.moe_expert_parallel import compile_layer
from m1jax.topology import topology_devices
print(json.dumps(compile_layer(topology_devices("v5p-16"), {"expert": 8}, 8, 256, "auto")))
"""


@pytest.mark.tpu
@pytest.mark.skipif(not libtpu_available(), reason="deviceless TPU compilation needs libtpu (m1jax.topology)")
def test_real_m1_moe_layer_compiles_for_v5p_with_ragged_all_to_all():
    """One real-size M1 MoE layer (bf16) compiled for 8 v5p chips, experts split 8 ways: the HLO exchanges tokens
    with ragged all-to-alls and gathers no expert weight; each chip holds only its 4 of the 32 experts."""
    r = run_deviceless(TPU_SCRIPT)
    assert r["ragged_all_to_all"] >= 2
    assert r["expert_weight_gather_bytes"] == 0
    config = ModelConfig.from_preset("minimax-m1-80k")
    expert_bytes = 3 * config.num_local_experts * config.hidden_size * config.intermediate_size * 2
    assert r["argument_bytes"] < expert_bytes / 8 * 1.05
