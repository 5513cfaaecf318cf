"""CISPO / GRPO-clip losses and the step-level token normaliser (train/losses.py)."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from m1jax.train.losses import (
    cispo_loss,
    cispo_loss_and_metrics,
    grpo_clip_loss,
    grpo_clip_loss_and_metrics,
    token_normalizer,
)

B, T, D, V = 8, 5, 6, 7
GROUP_IDS = np.array([40, 40, 3, 3, 17, 17, 5, 5], np.int32)  # non-contiguous, unsorted
LENGTHS = np.array([1, 5, 2, 2, 5, 4, 3, 1])  # unequal group totals: 6, 4, 9, 4


def _mask(lengths=LENGTHS, t=T):
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def _linear_logp(w_DxV, x_BxTxD, a_BxT):
    """A tiny linear "policy": logp_bt(W) = log_softmax(x_bt @ W)[a_bt]."""
    logits_BxTxV = jnp.einsum("btd,dv->btv", x_BxTxD, w_DxV)
    return jnp.take_along_axis(jax.nn.log_softmax(logits_BxTxV), a_BxT[..., None], axis=-1)[..., 0]


@pytest.fixture(scope="module")
def policy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    a = rng.integers(0, V, size=(B, T)).astype(np.int32)
    w = (0.5 * rng.normal(size=(D, V))).astype(np.float32)
    logp = np.asarray(jax.jit(_linear_logp)(w, x, a))
    # Off-policy old log-probs: ratios spread over ~[e^-2, e^2], so some exceed the cap 1 + eps_high = 2.
    old = (logp + rng.uniform(-2.0, 2.0, size=(B, T))).astype(np.float32)
    adv = rng.normal(size=B).astype(np.float32)
    return dict(x=x, a=a, w=w, logp=logp, adv=adv, old=old, mask=_mask(), gid=GROUP_IDS)


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def _policy_value_and_grad(w, x, a, old, adv, mask, gid, normalizer, *, loss_fn):
    """(loss, dloss/dW) of the linear policy; eps_high = 1 (cap 2); normalizer=None: group normalisation."""

    def loss(w):
        return loss_fn(_linear_logp(w, x, a), old, adv, mask, gid, eps_high=1.0, normalizer=normalizer)

    return jax.value_and_grad(loss)(w)


@jax.jit
def _coef_grad(w, x, a, coef_BxT):
    """sum_bt coef_bt * grad_W logp_bt from the per-token Jacobian (the shape of every hand-derived gradient)."""
    jac_BxTxDxV = jax.jacrev(_linear_logp)(w, x, a)
    return jnp.einsum("bt,btdv->dv", coef_BxT, jac_BxTxDxV)


# ----------------------------------------------------------------------------------------------- normaliser


def test_token_normalizer_values():
    mask = _mask()
    denom_group = token_normalizer(mask, GROUP_IDS, normalization="group")
    denom_batch = token_normalizer(mask, GROUP_IDS, normalization="batch")
    chex.assert_shape([denom_group, denom_batch], (B,))
    chex.assert_type([denom_group, denom_batch], jnp.float32)
    # group totals: 40 -> 6, 3 -> 4, 17 -> 9, 5 -> 4 tokens; K = 4 groups.
    np.testing.assert_array_equal(denom_group, 4.0 * np.array([6, 6, 4, 4, 9, 9, 4, 4]))
    np.testing.assert_array_equal(denom_batch, np.full(B, LENGTHS.sum()))
    # Static num_groups path with ids already in [0, G).
    dense = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(token_normalizer(mask, dense, num_groups=4), denom_group)
    with pytest.raises(ValueError, match="num_groups"):
        token_normalizer(mask, dense, num_groups=3)
    # A group without any response tokens is not counted in K and its rows get a harmless denominator 1.
    mask_empty = mask.copy()
    mask_empty[6:] = 0.0
    np.testing.assert_array_equal(
        token_normalizer(mask_empty, GROUP_IDS), 3.0 * np.array([6, 6, 4, 4, 9, 9, 1 / 3, 1 / 3])
    )
    with pytest.raises(ValueError, match="group_ids"):
        token_normalizer(mask, None, normalization="group")


def test_group_vs_batch_normalization_hand_computed():
    """Rows (group 7: lengths 1 and 3; group 3: length 2), logp = -1, r = 1: the CISPO token term is
    -A_b * logp = A_b, the GRPO-clip term is -r * A_b = -A_b."""
    mask = _mask([1, 3, 2], t=3)
    logp = np.full((3, 3), -1.0, np.float32)
    adv = np.array([1.0, 2.0, -3.0], np.float32)
    gid = np.array([7, 7, 3])
    # group: mean over groups of per-group token means = ((1 + 3*2) / 4 + (2 * -3) / 2) / 2 = -0.625
    # batch: all-token mean = (1 + 6 - 6) / 6 = 1/6
    for fn, sign in ((cispo_loss, 1.0), (grpo_clip_loss, -1.0)):
        group = fn(logp, logp, adv, mask, gid, normalization="group")
        batch = fn(logp, logp, adv, mask, gid, normalization="batch")
        np.testing.assert_allclose(group, sign * -0.625, rtol=1e-6)
        np.testing.assert_allclose(batch, sign * 1.0 / 6.0, rtol=1e-6)
    # Equal group totals make the two agree.
    mask_eq = _mask([1, 3, 4], t=4)
    logp4 = np.full((3, 4), -1.0, np.float32)
    np.testing.assert_allclose(cispo_loss(logp4, logp4, adv, mask_eq, gid, normalization="group"),
                               cispo_loss(logp4, logp4, adv, mask_eq, gid, normalization="batch"), rtol=1e-6)


# ----------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("normalization", ["group", "batch"])
def test_at_ratio_one_cispo_equals_reinforce_and_grpo(policy, normalization):
    w, x, a, adv, mask, gid = (policy[k] for k in ("w", "x", "a", "adv", "mask", "gid"))
    old = policy["logp"]  # first minibatch after sampling: r = 1 everywhere

    @jax.jit
    def grads(w):
        denom = token_normalizer(mask, gid, normalization=normalization)

        def reinforce(w):
            return jnp.sum(mask * -adv[:, None] * _linear_logp(w, x, a) / denom[:, None])

        def surrogate(loss_fn):
            return lambda w: loss_fn(_linear_logp(w, x, a), old, adv, mask, gid, normalization=normalization)

        return jax.grad(surrogate(cispo_loss))(w), jax.grad(surrogate(grpo_clip_loss))(w), jax.grad(reinforce)(w)

    g_cispo, g_grpo, g_reinforce = grads(w)
    chex.assert_trees_all_close(g_cispo, g_reinforce, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(g_grpo, g_reinforce, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(g_cispo).max()) > 1e-3


def test_gradient_matches_hand_formula_and_needs_stop_gradient(policy):
    """grad = -sum_bt clip(r_bt) A_b grad logp_bt / D_b; without sg it is -sum r A (1 + logp) grad logp / D."""
    w, x, a, logp, adv, old, mask, gid = (policy[k] for k in ("w", "x", "a", "logp", "adv", "old", "mask", "gid"))
    denom_B = np.asarray(token_normalizer(mask, gid))
    denom = denom_B[:, None]
    ratio = np.exp(logp - old)
    assert np.any((ratio > 2.0) & (mask > 0)) and np.any((ratio < 2.0) & (mask > 0))  # cap 2: some clipped
    weight = np.minimum(ratio, 2.0)

    _, g = _policy_value_and_grad(w, x, a, old, adv, mask, gid, denom_B, loss_fn=cispo_loss)
    g_hand = _coef_grad(w, x, a, -mask * weight * adv[:, None] / denom)
    chex.assert_trees_all_close(g, g_hand, rtol=1e-5, atol=1e-7)

    @jax.jit
    def no_stop_gradient(w):  # the bug: the IS weight differentiated too
        lp = _linear_logp(w, x, a)
        wt = jnp.minimum(jnp.exp(lp - old), 2.0)
        return jnp.sum(mask * -wt * adv[:, None] * lp / denom)

    g_bug = jax.grad(no_stop_gradient)(w)
    unclipped = (ratio < 2.0).astype(np.float32)
    g_bug_hand = _coef_grad(w, x, a, -mask * adv[:, None] * weight * (1.0 + unclipped * logp) / denom)
    chex.assert_trees_all_close(g_bug, g_bug_hand, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(g_bug - g).max()) > 1e-2


def test_clipped_token_still_gets_gradient():
    """r = e^3 > cap 5: CISPO's gradient on that token is -5 * A / N; GRPO-clip's is 0 (A > 0)."""
    logp = np.array([[-1.0, -2.0, -0.5]], np.float32)
    old = logp - np.array([[3.0, 0.0, 0.1]], np.float32)
    mask, adv, gid = np.ones((1, 3), np.float32), np.array([2.0], np.float32), np.array([0])
    g_cispo, g_grpo = jax.jit(lambda lp: (
        jax.grad(lambda lp: cispo_loss(lp, old, adv, mask, gid, eps_high=4.0))(lp),
        jax.grad(lambda lp: grpo_clip_loss(lp, old, adv, mask, gid, eps_low=0.2, eps_high=4.0))(lp),
    ))(logp)
    chex.assert_shape([g_cispo, g_grpo], (1, 3))
    np.testing.assert_allclose(g_cispo, [[-5.0 * 2.0 / 3.0, -1.0 * 2.0 / 3.0, -math.exp(0.1) * 2.0 / 3.0]], rtol=1e-6)
    assert float(g_grpo[0, 0]) == 0.0
    np.testing.assert_allclose(g_grpo[0, 1:], g_cispo[0, 1:], rtol=1e-6)


@pytest.mark.parametrize(
    "eps_low, expected_dropped", [(0.2, [[1, 0, 0, 0], [0, 1, 0, 0]]), (None, [[1, 0, 0, 0], [0, 0, 0, 0]])]
)
def test_masked_variant_drops_exactly_the_ppo_dropped_tokens(eps_low, expected_dropped):
    """Row 0 has A > 0, row 1 has A < 0; ratios 6 (> cap 5), 0.5 (< floor 0.8 when eps_low = 0.2), 1.2, 0.9."""
    r = np.array([[6.0, 0.5, 1.2, 0.9], [6.0, 0.5, 1.2, 0.9]])
    logp = np.full((2, 4), -1.0, np.float32)
    old = (logp - np.log(r)).astype(np.float32)
    adv, mask, gid = np.array([1.5, -0.7], np.float32), np.ones((2, 4), np.float32), np.array([0, 1])
    kw = dict(eps_low=eps_low, eps_high=4.0)

    @jax.jit
    def grads(lp):
        return (
            jax.grad(lambda lp: cispo_loss(lp, old, adv, mask, gid, masked=True, **kw))(lp),
            jax.grad(lambda lp: grpo_clip_loss(lp, old, adv, mask, gid, **kw))(lp),
            jax.grad(lambda lp: cispo_loss(lp, old, adv, mask, gid, **kw))(lp),
            cispo_loss_and_metrics(lp, old, adv, mask, gid, masked=True, **kw)[1],
        )

    g_masked, g_grpo, g_plain, metrics = grads(logp)
    dropped = np.asarray(expected_dropped, bool)
    np.testing.assert_array_equal(np.asarray(g_masked) == 0.0, dropped)
    np.testing.assert_array_equal(np.asarray(g_grpo) == 0.0, dropped)  # the tokens PPO clipping drops
    assert np.all(np.asarray(g_plain) != 0.0)  # plain CISPO drops nothing
    np.testing.assert_array_equal(np.where(dropped, 0.0, g_plain), g_masked)
    np.testing.assert_allclose(metrics["dropped_frac"], dropped.mean(), rtol=1e-6)


@pytest.mark.parametrize("loss_fn", [cispo_loss, grpo_clip_loss], ids=["cispo", "grpo"])
def test_padded_tokens_contribute_nothing(policy, loss_fn):
    """NaN/inf log-probs at padded positions change neither the loss nor the (finite) gradient."""
    adv, gid, mask = policy["adv"], policy["gid"], policy["mask"]
    rng = np.random.default_rng(1)
    logp = (-rng.uniform(0.1, 3.0, size=(B, T))).astype(np.float32)
    old = (logp + rng.uniform(-1.0, 1.0, size=(B, T))).astype(np.float32)
    garbage_logp = np.where(mask > 0, logp, np.nan).astype(np.float32)
    garbage_old = np.where(mask > 0, old, -np.inf).astype(np.float32)
    wide = ((0, 0), (0, 3))  # three more all-padding columns

    @jax.jit
    def run(lp, lp_dirty, old_dirty):
        vg = jax.value_and_grad(lambda lp, old, m: loss_fn(lp, old, adv, m, gid))
        return vg(lp, old, mask), vg(lp_dirty, old_dirty, mask), vg(jnp.pad(lp, wide), jnp.pad(old, wide),
                                                                     jnp.pad(mask, wide))

    (clean, g_clean), (dirty, g_dirty), (wider, _) = run(logp, garbage_logp, garbage_old)
    np.testing.assert_allclose(dirty, clean, rtol=1e-6)
    assert np.all(np.isfinite(g_dirty))
    np.testing.assert_array_equal(np.asarray(g_dirty)[mask == 0], 0.0)
    np.testing.assert_allclose(g_dirty, g_clean, rtol=1e-6)
    np.testing.assert_allclose(wider, clean, rtol=1e-6)


# ----------------------------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("loss_fn", [cispo_loss, grpo_clip_loss], ids=["cispo", "grpo"])
def test_microbatch_sum_equals_full_batch(policy, loss_fn):
    """1, 2, 4 micro-batches with the step normaliser sliced per micro-batch: summed losses and gradients equal
    the full-batch ones, also when micro-batches cut across groups (rows permuted)."""
    w, x, a, adv, old, mask, gid = (policy[k] for k in ("w", "x", "a", "adv", "old", "mask", "gid"))
    for normalization in ("group", "batch"):
        denom = np.asarray(token_normalizer(mask, gid, normalization=normalization))  # once, whole step batch
        # The loss computes the same denominators itself when given the whole batch.
        np.testing.assert_allclose(
            loss_fn(policy["logp"], old, adv, mask, gid, eps_high=1.0, normalization=normalization),
            loss_fn(policy["logp"], old, adv, mask, gid, eps_high=1.0, normalizer=denom), rtol=1e-6)
        full, g_full = _policy_value_and_grad(w, x, a, old, adv, mask, gid, denom, loss_fn=loss_fn)
        for num_micro in (2, 4):
            perm = np.random.default_rng(num_micro).permutation(B)
            total, g_total = 0.0, np.zeros_like(w)
            for r in np.array_split(perm, num_micro):
                value, grad = _policy_value_and_grad(w, x[r], a[r], old[r], adv[r], mask[r], gid[r], denom[r],
                                                     loss_fn=loss_fn)
                total, g_total = total + value, g_total + grad
            np.testing.assert_allclose(total, full, rtol=1e-5, atol=1e-7)
            chex.assert_trees_all_close(g_total, g_full, rtol=1e-5, atol=1e-6)

        # Negative control: normalising each micro-batch on its own (then averaging) is a different objective.
        naive = 0.0
        for r in np.array_split(np.random.default_rng(2).permutation(B), 2):
            local = token_normalizer(mask[r], gid[r], normalization=normalization)
            naive += float(_policy_value_and_grad(w, x[r], a[r], old[r], adv[r], mask[r], gid[r], local,
                                                  loss_fn=loss_fn)[0]) / 2
        assert abs(naive - float(full)) > 1e-4


def test_data_parallel_psum_equals_full_batch(policy):
    """shard_map over 4 devices: psum of per-shard losses with the global normaliser slice == full loss/grad."""
    if jax.device_count() < 4:
        pytest.skip("needs 4 (fake) devices")
    w, x, a, adv, old, mask, gid = (policy[k] for k in ("w", "x", "a", "adv", "old", "mask", "gid"))
    P = jax.sharding.PartitionSpec
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
    denom = token_normalizer(mask, gid)

    def per_shard(w, x, a, old, adv, mask, gid, denom):
        loss = cispo_loss(_linear_logp(w, x, a), old, adv, mask, gid, eps_high=1.0, normalizer=denom)
        return jax.lax.psum(loss, "data")

    def sharded_loss(w):
        return jax.shard_map(per_shard, mesh=mesh, in_specs=(P(),) + (P("data"),) * 7, out_specs=P())(
            w, x, a, old, adv, mask, gid, denom
        )

    full, g_full = _policy_value_and_grad(w, x, a, old, adv, mask, gid, np.asarray(denom), loss_fn=cispo_loss)
    value, grad = jax.jit(jax.value_and_grad(sharded_loss))(w)
    np.testing.assert_allclose(value, full, rtol=1e-5)
    chex.assert_trees_all_close(grad, g_full, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- API details


def test_jit_with_arbitrary_group_ids_matches_eager(policy):
    logp, old, adv, mask = policy["logp"], policy["old"], policy["adv"], policy["mask"]
    dense = np.unique(GROUP_IDS, return_inverse=True)[1]
    eager = cispo_loss(logp, old, adv, mask, dense, eps_high=1.0)
    jitted = jax.jit(lambda *a: cispo_loss(*a, eps_high=1.0))(logp, old, adv, mask, jnp.asarray(GROUP_IDS))
    jitted_ng = jax.jit(lambda *a: cispo_loss(*a, eps_high=1.0, normalizer=token_normalizer(a[3], a[4], num_groups=4)))(
        logp, old, adv, mask, jnp.asarray(dense)
    )
    chex.assert_shape([eager, jitted, jitted_ng], ())
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    np.testing.assert_allclose(jitted_ng, eager, rtol=1e-6)


def test_metrics_on_known_ratios():
    r = np.array([[6.0, 0.5, 1.0, 2.0], [1.0, 1.0, 9.0, 1.0]])
    logp = np.full((2, 4), -1.0, np.float32)
    old = (logp - np.log(r)).astype(np.float32)
    mask = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]], np.float32)  # the 9.0 is padding
    adv, gid = np.array([1.0, -1.0], np.float32), np.array([0, 0])
    loss, m = cispo_loss_and_metrics(logp, old, adv, mask, gid, eps_low=0.2)
    chex.assert_shape(loss, ())
    np.testing.assert_equal(int(m["num_tokens"]), 6)
    np.testing.assert_allclose(m["clip_frac_high"], 1 / 6, rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac_low"], 1 / 6, rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac"], 2 / 6, rtol=1e-6)
    np.testing.assert_allclose(m["is_weight_max"], 5.0, rtol=1e-6)
    np.testing.assert_allclose(m["is_weight_mean"], (5.0 + 0.8 + 1 + 2 + 1 + 1) / 6, rtol=1e-6)
    np.testing.assert_allclose(m["ratio_max"], 6.0, rtol=1e-6)
    np.testing.assert_allclose(m["ratio_min"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(m["ratio_mean"], (6 + 0.5 + 1 + 2 + 1 + 1) / 6, rtol=1e-6)
    kl = np.array([6.0, 0.5, 1.0, 2.0, 1.0, 1.0])
    np.testing.assert_allclose(m["approx_kl"], np.mean(kl - 1 - np.log(kl)), rtol=1e-5)
    _, m_grpo = grpo_clip_loss_and_metrics(logp, old, adv, mask, gid, eps_high=4.0)
    np.testing.assert_allclose(m_grpo["dropped_frac"], 1 / 6, rtol=1e-6)  # A > 0 and r = 6 > 5


def test_low_precision_inputs_are_promoted():
    logp = jnp.full((2, 3), -1.0, jnp.bfloat16)
    loss = cispo_loss(logp, logp, np.array([1.0, -0.5]), np.ones((2, 3)), np.array([0, 1]))
    chex.assert_type(loss, jnp.float32)
    np.testing.assert_allclose(loss, (1.0 - 0.5) / 2, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eps_high=0.0), "cap"),
        (dict(eps_high=-0.5), "cap"),
        (dict(eps_high=float("nan")), "cap"),
        (dict(eps_low=1.0), "lower bound"),
        (dict(eps_low=1.5), "lower bound"),
        (dict(eps_low=-0.1), "negative or NaN"),
        (dict(eps_low=0.0), "eps_low=None"),
        (dict(normalization="sequence"), "normalization"),
        (dict(max_log_ratio=0.0), "max_log_ratio"),
    ],
)
@pytest.mark.parametrize("loss_fn", [cispo_loss, grpo_clip_loss], ids=["cispo", "grpo"])
def test_bad_settings_rejected(kwargs, match, loss_fn):
    x = np.zeros((1, 2), np.float32)
    with pytest.raises(ValueError, match=match):
        loss_fn(x, x, np.ones(1), np.ones((1, 2)), np.zeros(1, np.int32), **kwargs)


def test_bad_shapes_rejected():
    x, m, i = np.zeros((2, 3), np.float32), np.ones((2, 3)), np.zeros(2, np.int32)
    with pytest.raises(ValueError, match="advantages"):
        cispo_loss(x, x, np.ones((2, 3)), m, i)
    with pytest.raises(ValueError, match="old_logp"):
        cispo_loss(x, np.zeros((2, 4)), np.ones(2), m, i)
    with pytest.raises(ValueError, match="normalizer"):
        cispo_loss(x, x, np.ones(2), m, None, normalizer=np.ones(3))
    with pytest.raises(ValueError, match="integers"):
        cispo_loss(x, x, np.ones(2), m, np.zeros(2))
