"""expert_threshold (issue 11): each token keeps the smallest prefix of its top-k experts whose renormalised
weights reach the threshold. 1.0 is the exact model bit for bit in every MoE implementation (expert-parallel
included); a lower threshold computes fewer expert rows, with routing logs that add up; rows of one batch with
different thresholds equal each row alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1jax.config import ModelConfig
from m1jax.model import MiniMaxM1
from m1jax.modules import moe
from m1jax.sharding import make_mesh

IMPLS = ["dense", "gather", "switch", "ragged", "tiled"]
LAYERS = ("linear_attention", "full_attention")


def config(**kw) -> ModelConfig:
    # a wide router init makes the routing weights uneven, so thresholds < 1 drop a fair share of second experts
    return ModelConfig.from_preset("tiny").replace(num_attention_heads=8, num_key_value_heads=4, initializer_range=0.2,
                                                   num_hidden_layers=2, layer_types=LAYERS, **kw)


def tokens(b=3, l=24, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 512, (b, l)))


def test_route_keeps_the_smallest_prefix_reaching_the_threshold():
    probs = np.array([[0.5, 0.3, 0.1, 0.1, 0.0, 0.0],      # top-3 weights 5/9, 3/9, 1/9
                      [0.05, 0.05, 0.1, 0.7, 0.05, 0.05],  # 0.7/0.85, 0.1/0.85, 0.05/0.85
                      [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]])     # 1/3 each
    logits = np.log(np.maximum(probs, 1e-30)).astype(np.float32)
    x, gate = jnp.asarray(logits), jnp.eye(6)  # x·I = the logits
    tau = jnp.array([0.6, 0.8, 1.0])
    p, w, e = moe.route(x, gate, 3, threshold_T=tau)
    e = np.asarray(e)
    assert e[0, 0] == 0 and e[0, 1] == 1 and e[0, 2] == 6  # 5/9 < 0.6 ≤ 8/9: two kept; the third is id E (dropped)
    assert e[1, 0] == 3 and (e[1, 1:] == 6).all()  # 0.7/0.85 ≥ 0.8: one kept
    assert (e[2] < 6).all()  # τ = 1 keeps all k
    np.testing.assert_allclose(np.asarray(w)[0], [5 / 8, 3 / 8, 0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(w)[1], [1, 0, 0], rtol=1e-6)
    _, w_exact, e_exact = moe.route(x, gate, 3)
    np.testing.assert_array_equal(np.asarray(w)[2], np.asarray(w_exact)[2])  # bit for bit
    np.testing.assert_array_equal(e[2], np.asarray(e_exact)[2])


@pytest.mark.parametrize("impl", IMPLS)
def test_threshold_one_is_the_exact_layer_bit_for_bit(impl):
    c = config(moe_impl=impl)
    layer = moe.MoE(c, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 12, c.hidden_size))
    y_exact, stats_exact = jax.jit(lambda x: layer(x))(x)
    y_one, stats_one = jax.jit(lambda x, tau: layer(x, threshold_BxL=tau))(x, jnp.ones((3, 12)))
    np.testing.assert_array_equal(np.asarray(y_one), np.asarray(y_exact))
    for key in stats_exact:
        np.testing.assert_array_equal(np.asarray(stats_one[key]), np.asarray(stats_exact[key]), err_msg=key)
    assert float(stats_one["expert_flops_saved"]) == 0


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_threshold_one_is_the_exact_model_bit_for_bit(scan):
    model = MiniMaxM1(config(scan_layers=scan), rngs=nnx.Rngs(0))
    t = tokens()
    exact = jax.jit(lambda t: model(t, return_routing="experts"))(t)
    one = jax.jit(lambda t, tau: model(t, expert_threshold=tau, return_routing="experts"))(t, jnp.ones(3))
    np.testing.assert_array_equal(np.asarray(one.logits), np.asarray(exact.logits))
    np.testing.assert_array_equal(np.asarray(one.routed_experts()), np.asarray(exact.routed_experts()))
    assert one.routed_experts().shape == (3, 24, 2, 2)


def reference_moe(layer, x_TxD, tau):
    """Σ_kept w_j FFN_{e_j}(x) per token in numpy (float64), the kept set and weights by the documented rule."""
    gate = np.asarray(layer.gate[...], np.float64)
    w1, w3, w2 = (np.asarray(getattr(layer, n)[...], np.float64) for n in ("w1", "w3", "w2"))
    x = np.asarray(x_TxD, np.float64)
    z = x @ gate
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    k = layer.config.num_experts_per_tok
    out, kept = np.zeros_like(x), 0
    for t in range(len(x)):
        top = np.argsort(-p[t], kind="stable")[:k]
        w = p[t, top] / p[t, top].sum()
        n = next(j + 1 for j in range(k) if w[:j + 1].sum() >= tau[t] or j == k - 1)
        kept += n
        for e, wj in zip(top[:n], p[t, top[:n]] / p[t, top[:n]].sum()):
            h = x[t] @ w1[e]
            out[t] += wj * ((h / (1 + np.exp(-h))) * (x[t] @ w3[e])) @ w2[e]
    return out, kept


@pytest.mark.parametrize("impl", IMPLS)
def test_lower_threshold_computes_fewer_expert_rows_and_logs_add_up(impl, monkeypatch):
    c = config(moe_impl=impl)
    layer = moe.MoE(c, rngs=nnx.Rngs(2))
    b, l, k, e = 4, 16, c.num_experts_per_tok, c.num_local_experts
    x = jax.random.normal(jax.random.PRNGKey(0), (b, l, c.hidden_size))
    valid = jnp.arange(l)[None] >= jnp.array([0, 3, 9, 0])[:, None]  # left padding
    tau_BxL = jnp.broadcast_to(jnp.array([0.55, 0.7, 0.9, 1.0])[:, None], (b, l))
    group_rows = []
    sort = moe._sort_assignments
    monkeypatch.setattr(moe, "_sort_assignments", lambda ex, n: group_rows.append(sort(ex, n)[1]) or sort(ex, n))
    y, stats = layer(x, valid_BxL=valid, threshold_BxL=tau_BxL)
    v_T = np.asarray(valid).reshape(-1)
    ref_valid, kept_all = reference_moe(layer, x.reshape(b * l, -1)[v_T], np.asarray(tau_BxL).reshape(-1)[v_T])
    ref = np.zeros((b * l, c.hidden_size), np.float32)
    ref[v_T] = ref_valid  # padding runs no expert
    np.testing.assert_allclose(np.asarray(y).reshape(b * l, -1), ref, rtol=1e-4, atol=1e-5)
    assert kept_all < v_T.sum() * k  # something was dropped
    if impl in ("ragged", "tiled"):  # the grouped GEMMs see only the kept assignments of valid tokens
        assert [int(g.sum()) for g in group_rows] == [kept_all]
    routed = np.asarray(stats["routed_experts"])
    assert routed.shape == (b, l, k) and ((routed >= -1) & (routed < e)).all()
    v = np.asarray(valid)
    kept_valid = int((routed[v] >= 0).sum())
    assert float(stats["tokens_per_expert"].sum()) == kept_valid
    np.testing.assert_array_equal(np.asarray(stats["tokens_per_expert"]),
                                  [np.sum(routed[v] == j) for j in range(e)])
    used = np.asarray(stats["experts_used_frac"])
    np.testing.assert_allclose(used.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(used, [np.mean((routed[v] >= 0).sum(-1) == j + 1) for j in range(k)], rtol=1e-6)
    per = moe.expert_flops_per_assignment(c)
    assert float(stats["expert_flops"]) == kept_valid * per
    assert float(stats["expert_flops_saved"]) == (v.sum() * k - kept_valid) * per
    assert float(stats["expert_flops_saved"]) > 0


@pytest.mark.parametrize("impl", ["switch", "tiled"])
def test_mixed_thresholds_in_one_batch_equal_each_row_alone(impl):
    model = MiniMaxM1(config(moe_impl=impl, scan_layers=impl == "tiled"), rngs=nnx.Rngs(1))
    t = tokens(3, 20, seed=1)
    tau = jnp.array([0.5, 1.0, 0.75])
    fwd = jax.jit(lambda t, tau: model(t, expert_threshold=tau, return_routing="experts"))
    both = fwd(t, tau)
    for i in range(3):
        alone = fwd(t[i:i + 1], tau[i:i + 1])
        np.testing.assert_allclose(np.asarray(both.logits[i]), np.asarray(alone.logits[0]), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(both.routed_experts()[i]), np.asarray(alone.routed_experts()[0]))
    assert (np.asarray(both.routed_experts()[0]) == -1).any()


@pytest.mark.parametrize("mesh_shape, b, l", [({"expert": 4}, 4, 8), ({"tensor": 2, "expert": 2}, 3, 1)],
                         ids=["exchange", "replicated"])
def test_expert_parallel_threshold(mesh_shape, b, l):
    """On a 4-device mesh (tokens exchanged over the expert axis, or replicated for batch 1): τ = 1 is the
    exact sharded forward bit for bit, a lower τ equals the single-device model."""
    c = config()
    layer = moe.MoE(c, rngs=nnx.Rngs(5))
    x = jax.random.normal(jax.random.PRNGKey(1), (b, l, c.hidden_size))
    tau = jnp.broadcast_to(jnp.linspace(0.5, 1.0, b)[:, None], (b, l))
    fwd = jax.jit(lambda x, tau: layer(x, threshold_BxL=tau))
    fwd_exact = jax.jit(lambda x: layer(x))
    y_ref, stats_ref = fwd(x, tau)
    with jax.set_mesh(make_mesh(mesh_shape, devices=jax.devices()[:4])):
        text = fwd.lower(x, tau).as_text()
        y, stats = fwd(x, tau)
        y_one, _ = fwd(x, jnp.ones_like(tau))
        y_exact, _ = fwd_exact(x)
    assert "all_to_all" in text or "all_reduce" in text  # the expert-parallel path ran
    np.testing.assert_array_equal(np.asarray(y_one), np.asarray(y_exact))
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(stats["routed_experts"]), np.asarray(stats_ref["routed_experts"]))
    assert float(stats["expert_flops_saved"]) > 0


def test_threshold_input_errors_name_the_problem():
    model = MiniMaxM1(config(), rngs=nnx.Rngs(0))
    t = tokens(2, 4)
    with pytest.raises(ValueError, match="expert_threshold must be a float array"):
        model(t, expert_threshold=jnp.ones(3))
    with pytest.raises(ValueError, match="not both"):
        model(t, expert_threshold=jnp.ones(2), routed_experts=jnp.zeros((2, 4, 4, 2), jnp.int32))
    with pytest.raises(ValueError, match="return_routing"):
        model(t, return_routing="yes")


@pytest.mark.slow
def test_scheduler_requests_with_thresholds_equal_generate_alone_with_routing_logs():
    """Requests with different thresholds share the scheduler's slots; each request's greedy tokens and routed
    experts equal `Engine.generate` of its prompt alone with its threshold, and its routing log adds up."""
    from m1jax.generation import Engine
    from m1jax.sampling import SamplingParams
    from m1jax.serving import Request, Scheduler

    c = config()
    model = MiniMaxM1(c, rngs=nnx.Rngs(4))
    engine = Engine(model, prefill_chunk=16)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=(), repetition_stop=None)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 500, n).tolist() for n in (5, 19, 9)]
    taus = [1.0, 0.6, 0.75]
    sched = Scheduler(engine, slots=2, context_window=64, prefill_chunk=16, decode_steps=4)
    outs = sched.run([Request(prompt=p, sampling=greedy, expert_threshold=t, return_routed_experts=i > 0)
                      for i, (p, t) in enumerate(zip(prompts, taus, strict=True))])
    k, n_layers = c.num_experts_per_tok, c.num_hidden_layers
    for i, (p, t, out) in enumerate(zip(prompts, taus, outs, strict=True)):
        [ref] = engine.generate([p], greedy, expert_threshold=t, return_routed_experts=True)
        assert out.tokens == ref.tokens
        assert (out.routed_experts is None) == (i == 0)
        if out.routed_experts is not None:
            np.testing.assert_array_equal(out.routed_experts, ref.routed_experts)
        log = out.routing
        assert log["tokens"] == len(p) + len(out.tokens) and len(log["layers"]) == n_layers
        kept = (ref.routed_experts >= 0).sum(axis=(0, 2))
        per = moe.expert_flops_per_assignment(c)
        for j, layer in enumerate(log["layers"]):
            assert sum(layer["tokens_per_expert"]) == kept[j]
            assert sum(layer["experts_used_frac"]) == pytest.approx(1.0)
            assert layer["expert_flops"] + layer["expert_flops_saved"] == log["tokens"] * k * per
        assert (log["expert_flops_saved"] > 0) == (t < 1.0)
