"""Routing replay (issue 12): a forward given routed experts uses them instead of its own top-k, with weights from
its own router; given its own routing it is the same computation (values and gradients). The train/infer
mismatch meter computes what its docstring says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1jax.config import ModelConfig
from m1jax.model import MiniMaxM1, ModelOutput
from m1jax.modules import moe
from train.logprobs import probability_agreement, sequence_logprobs

LAYERS = ("linear_attention", "full_attention")


def config(**kw) -> ModelConfig:
    return ModelConfig.from_preset("tiny").replace(num_attention_heads=8, num_key_value_heads=4, initializer_range=0.2,
                                                   num_hidden_layers=2, layer_types=LAYERS, **kw)


def batch(b=2, l=12, seed=0):
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 512, (b, l)))
    valid = jnp.arange(l)[None] >= jnp.array([0, 3] + [0] * (b - 2))[:, None]
    return tokens, valid


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_replaying_own_routing_is_the_same_forward(scan):
    model = MiniMaxM1(config(scan_layers=scan), rngs=nnx.Rngs(0))
    tokens, valid = batch()
    fwd = jax.jit(lambda t, r: model(t, valid_BxL=valid, routed_experts=r, return_routing="experts"))
    own = jax.jit(lambda t: model(t, valid_BxL=valid, return_routing="experts"))(tokens)
    routed = own.routed_experts()
    assert routed.shape == (2, 12, 2, 2)
    replayed = fwd(tokens, routed)
    np.testing.assert_array_equal(np.asarray(replayed.logits), np.asarray(own.logits))
    np.testing.assert_array_equal(np.asarray(replayed.routed_experts()), np.asarray(routed))
    per_layer = fwd(tokens, tuple(routed[:, :, i] for i in range(2)))  # the per-layer form
    np.testing.assert_array_equal(np.asarray(per_layer.logits), np.asarray(own.logits))


def test_replaying_own_routing_gives_the_same_gradient():
    model = MiniMaxM1(config(), rngs=nnx.Rngs(0))
    tokens, valid = batch(2, 8)
    graphdef, params = nnx.split(model)
    routed = jax.jit(lambda t: model(t, valid_BxL=valid, return_routing="experts").routed_experts())(tokens)

    def loss(p, replay):
        out = sequence_logprobs(nnx.merge(graphdef, p), tokens, valid_BxL=valid, routed_experts_BxLxNxK=replay)
        return jnp.sum(out.logp_BxL * valid)

    grad = jax.jit(jax.value_and_grad(loss))
    l_own, g_own = grad(params, None)
    l_rep, g_rep = grad(params, routed)
    np.testing.assert_array_equal(np.asarray(l_rep), np.asarray(l_own))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_rep), jax.tree.leaves(g_own), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7, err_msg=str(path))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_rep))


def test_replaying_a_thresholded_routing_reproduces_it():
    model = MiniMaxM1(config(), rngs=nnx.Rngs(1))
    tokens, valid = batch(3, 10, seed=1)
    tau = jnp.array([0.5, 0.7, 1.0])
    thr = jax.jit(lambda t: model(t, valid_BxL=valid, expert_threshold=tau, return_routing="experts"))(tokens)
    routed = thr.routed_experts()
    assert (np.asarray(routed) == moe.NO_EXPERT).any()
    rep = jax.jit(lambda t, r: model(t, valid_BxL=valid, routed_experts=r, return_routing="experts"))(tokens, routed)
    np.testing.assert_array_equal(np.asarray(rep.logits), np.asarray(thr.logits))
    np.testing.assert_array_equal(np.asarray(rep.routed_experts()), np.asarray(routed))
    for a, b in zip(rep.routing, thr.routing, strict=True):
        np.testing.assert_array_equal(np.asarray(a["expert_flops_saved"]), np.asarray(b["expert_flops_saved"]))


def test_replayed_experts_get_their_router_weights_renormalised():
    """Given experts other than the top-k: y = Σ_given p_e / Σ_given p · FFN_e(x) (dense reference)."""
    c = config()
    layer = moe.MoE(c, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, c.hidden_size))
    given = jnp.asarray(np.random.default_rng(0).permutation(np.tile(np.arange(4), 5))[:20].reshape(2, 5, 2))
    given = given.at[:, :, 1].set((given[:, :, 0] + 1 + jnp.arange(5) % 3) % 4)  # two distinct experts a token
    given = given.at[1, 2, 1].set(moe.NO_EXPERT)  # one choice dropped
    y, stats = layer(x, experts_BxLxK=given)
    probs = jax.nn.softmax(x.reshape(10, -1) @ layer.gate[...], axis=-1)
    g = np.asarray(given).reshape(10, 2)
    w = np.where(g >= 0, np.take_along_axis(np.asarray(probs), np.maximum(g, 0), axis=1), 0.0)
    w = w / w.sum(1, keepdims=True)
    ids = np.where(g >= 0, g, c.num_local_experts)
    ref = moe.experts_dense(x.reshape(10, -1), layer.w1[...], layer.w3[...], layer.w2[...], jnp.asarray(w),
                            jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(y).reshape(10, -1), np.asarray(ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(stats["routed_experts"]), np.asarray(given))
    assert float(stats["tokens_per_expert"].sum()) == 19


def test_replay_input_errors_name_the_problem():
    model = MiniMaxM1(config(), rngs=nnx.Rngs(0))
    tokens, _ = batch(2, 4)
    with pytest.raises(ValueError, match=r"routed_experts must be \[batch, seq, layers, k\] = \[2, 4, 2, k\]"):
        model(tokens, routed_experts=jnp.zeros((2, 4, 3, 2), jnp.int32))
    with pytest.raises(ValueError, match="integer expert ids"):
        model(tokens, routed_experts=jnp.zeros((2, 4, 2, 2)))
    with pytest.raises(ValueError, match="return_routing"):
        ModelOutput(logits=None, hidden=jnp.zeros((2, 4, 64)), routing=None).routed_experts()


def test_mismatch_meter_on_a_constructed_case():
    sampler = np.array([[0.0, -1.0, -2.0, -0.5, 0.0],
                        [0.0, 0.0, -0.2, -3.0, -1.0]])
    trainer = np.array([[9.0, -1.1, -2.0, -0.2, 7.0],   # padding positions differ wildly: must not count
                        [5.0, 0.0, -0.2, -2.0, -1.5]])
    mask = np.array([[0, 1, 1, 1, 0],
                     [0, 0, 1, 1, 1]])
    m = probability_agreement(sampler, trainer, mask)
    d = np.array([0.1, 0.0, 0.3, 0.0, 1.0, 0.5])  # |Δlogp| of the 6 response tokens, row-major
    assert m["logp_abs_diff_mean"] == pytest.approx(d.mean())
    assert m["logp_abs_diff_max"] == pytest.approx((0.3 + 1.0) / 2)  # mean over rows of the row max
    s = np.array([-1.0, -2.0, -0.5, -0.2, -3.0, -1.0])
    t = np.array([-1.1, -2.0, -0.2, -0.2, -2.0, -1.5])
    assert m["logp_corr"] == pytest.approx(np.corrcoef(s, t)[0, 1])
    assert m["sampler_trainer_corr"] == pytest.approx(np.corrcoef(np.exp(s), np.exp(t))[0, 1])
    assert m["sampler_trainer_abs_dp"] == pytest.approx(np.mean(np.abs(np.exp(s) - np.exp(t))))
    same = probability_agreement(sampler, sampler, mask)
    assert same["logp_corr"] == pytest.approx(1.0) and same["logp_abs_diff_max"] == 0.0
    with pytest.raises(ValueError, match="one shape"):
        probability_agreement(sampler, trainer[:, :4], mask)
