"""MoE: every dropless dispatch equals the dense reference (values and gradients); routing statistics add up."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1jax.config import ModelConfig
from m1jax.modules import moe


def weights(e=6, d=16, f=24, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (0.3 * jax.random.normal(ks[0], (d, e)), 0.2 * jax.random.normal(ks[1], (e, d, f)),
            0.2 * jax.random.normal(ks[2], (e, d, f)), 0.2 * jax.random.normal(ks[3], (e, f, d)))


@pytest.mark.parametrize("impl", ["gather", "switch", "ragged", "tiled"])
@pytest.mark.parametrize("tokens, k", [(1, 2), (5, 2), (64, 2), (300, 3)])
def test_dispatch_equals_dense(impl, tokens, k):
    gate, w1, w3, w2 = weights()
    x = jax.random.normal(jax.random.PRNGKey(tokens), (tokens, 16))
    _, wts, idx = moe.route(x, gate, k)
    ref = moe.experts_dense(x, w1, w3, w2, wts, idx)
    got = jax.jit(moe.EXPERT_IMPLS[impl])(x, w1, w3, w2, wts, idx)
    chex.assert_shape(got, (tokens, 16))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_tiled_handles_skewed_routing_and_empty_experts():
    gate, w1, w3, w2 = weights(e=8)
    x = jax.random.normal(jax.random.PRNGKey(1), (200, 16))
    idx = jnp.stack([jnp.zeros(200, jnp.int32), jnp.where(jnp.arange(200) < 3, 5, 7)], 1)  # experts 0, 5, 7 only
    wts = jnp.full((200, 2), 0.5)
    ref = moe.experts_dense(x, w1, w3, w2, wts, idx)
    for tile in (8, 16, 128):
        got = moe.experts_tiled(x, w1, w3, w2, wts, idx, tile_rows=tile)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["switch", "ragged", "tiled"])
def test_dispatch_gradients_equal_dense(impl):
    gate, w1, w3, w2 = weights(seed=3)
    x = jax.random.normal(jax.random.PRNGKey(4), (40, 16))

    def loss(fn, x, w1, w3, w2):
        _, wts, idx = moe.route(x, gate, 2)
        return jnp.sum(jnp.sin(fn(x, w1, w3, w2, wts, idx)))

    g_ref = jax.grad(lambda *a: loss(moe.experts_dense, *a), argnums=(0, 1, 2, 3))(x, w1, w3, w2)
    g = jax.grad(lambda *a: loss(moe.EXPERT_IMPLS[impl], *a), argnums=(0, 1, 2, 3))(x, w1, w3, w2)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_switch_reads_unstacked_expert_tuples():
    gate, w1, w3, w2 = weights(e=5)
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 16))
    _, wts, idx = moe.route(x, gate, 2)
    ref = moe.experts_dense(x, w1, w3, w2, wts, idx)
    tuples = [tuple(w[e] for e in range(5)) for w in (w1, w3, w2)]
    got = jax.jit(moe.experts_switch)(x, *tuples, wts, idx)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 40])
def test_unstacked_model_parameters_give_the_same_forward(tokens):
    """`unstack_experts` turns each expert weight into a tuple; decode-sized inputs branch into it, larger ones
    stack it back — both equal the model with stacked weights."""
    from m1jax.demo import demo_model

    model = demo_model("tiny", seed=1)
    graphdef, params = nnx.split(model)
    unstacked = moe.unstack_experts(params)
    w1 = unstacked["layers"][0]["block_sparse_moe"]["w1"].get_value()
    assert isinstance(w1, tuple) and len(w1) == model.config.num_local_experts
    chex.assert_trees_all_equal(w1[2], params["layers"][0]["block_sparse_moe"]["w1"].get_value()[2])
    assert not isinstance(unstacked["layers"][0]["block_sparse_moe"]["gate"].get_value(), tuple)
    tok = jax.random.randint(jax.random.PRNGKey(0), (1, tokens), 0, model.config.vocab_size)
    fwd = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t).logits)
    np.testing.assert_allclose(fwd(unstacked, tok), fwd(params, tok), rtol=1e-5, atol=1e-5)


def test_auto_picks_switch_for_decode_on_cpu_only_when_small():
    cpu = jax.default_backend() == "cpu"
    assert moe.choose_impl("auto", 2, 8) == ("switch" if cpu else "gather")
    assert moe.choose_impl("auto", 16, 8) == ("switch" if cpu else "ragged")
    assert moe.choose_impl("auto", 17, 8) == ("tiled" if cpu else "ragged")
    assert moe.choose_impl("dense", 2, 8) == "dense"


@pytest.mark.parametrize("dtype,precision", [(jnp.bfloat16, jax.lax.Precision.DEFAULT),
                                             (jnp.float32, jax.lax.Precision.HIGHEST)])
def test_ragged_dot_precision_follows_operands(dtype, precision):
    """TPU's grouped GEMM rejects HIGHEST on bf16 operands: bf16 gets an explicit DEFAULT (whatever the global
    default precision), fp32 HIGHEST (tests/test_aot.py compiles the MoE for TPU)."""
    x, w = jnp.ones((8, 16), dtype), jnp.ones((2, 16, 4), dtype)
    (eqn,) = jax.make_jaxpr(moe._ragged_dot)(x, w, jnp.array([3, 5], jnp.int32)).eqns
    assert eqn.params["precision"] == (precision, precision)


def test_router_is_softmax_then_topk_then_renormalise():
    gate, *_ = weights()
    x = jax.random.normal(jax.random.PRNGKey(7), (10, 16))
    probs, wts, idx = moe.route(x, gate, 2)
    expected = jax.nn.softmax(x @ gate, -1)
    np.testing.assert_allclose(probs, expected, rtol=1e-6)
    top = np.argsort(-np.asarray(expected), -1)[:, :2]
    np.testing.assert_array_equal(np.sort(idx, -1), np.sort(top, -1))
    np.testing.assert_allclose(wts.sum(-1), 1.0, rtol=1e-6)
    assert probs.dtype == jnp.float32 and idx.dtype == jnp.int32


def test_routing_stats_add_up_and_skip_padding():
    c = ModelConfig.from_preset("tiny")
    layer = moe.MoE(c, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, c.hidden_size))
    valid = jnp.arange(9)[None, :] >= jnp.array([[0], [4]])  # second row left-padded by 4
    y, stats = layer(x, valid_BxL=valid)
    n_valid = int(valid.sum())
    assert float(stats["tokens_per_expert"].sum()) == c.num_experts_per_tok * n_valid
    assert float(stats["num_tokens"]) == n_valid
    np.testing.assert_allclose(float(stats["mean_prob"].sum()), 1.0, rtol=1e-5)
    _, stats_valid_only = layer(x[1:, 4:])
    np.testing.assert_allclose(
        stats["tokens_per_expert"] - stats_valid_only["tokens_per_expert"],
        layer(x[:1])[1]["tokens_per_expert"])
    y_dense, _ = layer(x, valid_BxL=valid, impl="dense")
    np.testing.assert_allclose(y, y_dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["dense", "gather", "switch", "ragged", "tiled"])
def test_padding_runs_no_expert(impl):
    """Padding tokens (and finished decode rows) are left out of the expert computation: their output is 0, the
    valid tokens' outputs equal those of the unpadded input, and the routing record still holds their choices."""
    c = ModelConfig.from_preset("tiny")
    layer = moe.MoE(c, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 6, c.hidden_size))
    valid = jnp.arange(6)[None, :] >= jnp.array([[0], [4]])  # second row: 4 padding tokens
    y, stats = layer(x, valid_BxL=valid, impl=impl)
    np.testing.assert_array_equal(np.asarray(y[1, :4]), 0.0)
    np.testing.assert_allclose(y[1, 4:], layer(x[1:, 4:], impl=impl)[0][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y[0], layer(x[:1], impl=impl)[0][0], rtol=1e-5, atol=1e-6)
    _, unmasked = layer(x, impl=impl)
    np.testing.assert_array_equal(stats["routed_experts"], unmasked["routed_experts"])


def test_tile_size_is_the_least_power_of_two_covering_a_mean_group():
    assert moe.tile_size(512, 8) == 64  # a 256-token prefill chunk of bench-small: one tile per mean group
    assert moe.tile_size(520, 8) == 128
    assert moe.tile_size(4096, 8) == moe.TILE_ROWS
    assert moe.tile_size(16, 8) == 8
