"""Routing replay (issue 12): a forward given routed experts uses them instead of its own top-k, with weights from
its own router; given its own routing it is the same computation (values and gradients). The train/infer
mismatch meter computes what its docstring says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from m1jax.train.logprobs import probability_agreement, sequence_logprobs

from m1jax.config import ModelConfig
from m1jax.model import MiniMaxM1, ModelOutput
from m1jax.modules import moe

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


def test_engine_records_the_routing_a_full_forward_computes():
    """`generate(..., return_routed_experts=True)`: the prompt's and the generated tokens' routed experts (with
    per-row thresholds) are those of one forward over prompt + response; thresholds and recording change no
    token of a greedy run at τ = 1."""
    from m1jax.generation import Engine
    from m1jax.sampling import SamplingParams

    model = MiniMaxM1(config(), rngs=nnx.Rngs(0))
    engine = Engine(model, prefill_chunk=4)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=5, stop_token_ids=(), repetition_stop=None)
    prompts = [[5, 6, 7, 8, 9, 10], [9, 10]]
    recorded = engine.generate(prompts, greedy, return_routed_experts=True, expert_threshold=[0.6, 1.0])
    plain = engine.generate(prompts, greedy)
    assert recorded[1].tokens == plain[1].tokens and plain[0].routed_experts is None
    fwd = jax.jit(lambda t, tau: model(t, expert_threshold=tau, return_routing="experts").routed_experts())
    for p, r, tau in zip(prompts, recorded, (0.6, 1.0), strict=True):
        assert r.routed_experts.shape == (len(p) + 5, 2, 2) and r.routed_experts.dtype == np.int32
        full = fwd(jnp.asarray([p + r.tokens]), jnp.asarray([tau]))
        np.testing.assert_array_equal(r.routed_experts, np.asarray(full[0]))
    assert (recorded[0].routed_experts == -1).any() and (recorded[1].routed_experts >= 0).all()


def test_engine_threshold_errors_name_the_field():
    from m1jax.generation import GenerationError, expert_thresholds

    assert expert_thresholds(None, 2) is None and expert_thresholds([1.0, None], 2) is None
    np.testing.assert_array_equal(expert_thresholds(0.5, 2), [0.5, 0.5])
    for bad in (0.0, 1.5, True, "0.5", float("nan")):
        with pytest.raises(GenerationError, match="expert_threshold must be a number in"):
            expert_thresholds(bad, 1)
    with pytest.raises(GenerationError, match="expert_threshold: got 1 values for 2"):
        expert_thresholds([0.5], 2)


def test_pack_rollouts_places_the_routed_experts_with_their_tokens():
    from m1jax.train.rollout import pack_rollouts

    class R:  # a GenerationResult stand-in
        def __init__(self, prompt, tokens):
            self.tokens, self.logprobs = tokens, [-0.5] * len(tokens)
            n = len(prompt) + len(tokens)
            self.routed_experts = np.arange(n * 2 * 2, dtype=np.int32).reshape(n, 2, 2)

    prompts = [[1, 2], [1, 2, 3]]
    results = [R(prompts[0], [7, 8, 9]), R(prompts[1], [7])]
    packed = pack_rollouts(prompts, results, 4, 3)
    r = packed.routed_experts_NxLxNxK
    assert r.shape == (2, 7, 2, 2)
    np.testing.assert_array_equal(r[0, 2:], results[0].routed_experts)
    np.testing.assert_array_equal(r[1, 1:5], results[1].routed_experts)
    assert (r[0, :2] == -1).all() and (r[1, 0] == -1).all() and (r[1, 5:] == -1).all()
    assert pack_rollouts(prompts, [R(p, t.tokens) for p, t in zip(prompts, results)], 4, 3).routed_experts_NxLxNxK \
        is not None


@pytest.mark.slow
def test_cispo_step_with_routing_replay(tmp_path):
    """One CISPO step of the reverse-3 example with `cispo.routing_replay`: the same rollouts as without, the
    same update (the replayed routing is the trainer's own here, fp32 on one machine), the mismatch logged."""
    import yaml
    from m1jax.train.cispo_trainer import CISPOTrainer
    from m1jax.train.run_config import load_run_config

    runs = {}
    for replay in (False, True):
        data = yaml.safe_load(open("configs/train/cispo_reverse3.yaml").read())
        data.update(steps=1, output_dir=str(tmp_path / f"r{replay}"))
        data["rollout"].update(num_prompts=4, group_size=4)
        data["cispo"].update(num_minibatches=2, routing_replay=replay)
        data["log"] = {"progress": False}
        path = tmp_path / f"r{replay}.yaml"
        path.write_text(yaml.safe_dump(data))
        trainer = CISPOTrainer(load_run_config(path, "cispo"))
        [runs[replay]] = trainer.run()
        trainer.close()
    a, b = runs[False], runs[True]
    assert a["reward_mean"] == b["reward_mean"]
    for key in ("loss", "grad_norm", "logp_abs_diff_mean", "logp_corr"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert b["logp_abs_diff_mean"] < 1e-4 and b["logp_corr"] > 0.999
