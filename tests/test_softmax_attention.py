"""The softmax attention core: causal query chunks and the blocked online softmax equal one dense masked softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.modules import softmax_attention as sa


def reference(q, k, v, q_slot, valid):
    """Plain GQA attention in float64 numpy."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("blhd,bshd->bhls", q, k) / np.sqrt(q.shape[-1])
    vis = (np.arange(k.shape[1])[None, :] <= np.asarray(q_slot)[:, None])[None, None] & np.asarray(valid)[:, None,
                                                                                                         None, :]
    s = np.where(vis, s, -np.inf)
    with np.errstate(invalid="ignore"):
        p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhls,bshd->blhd", p / p.sum(-1, keepdims=True), v)


def data(b, l, s, h=4, kh=2, d=8, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (b, l, h, d)), jax.random.normal(ks[1], (b, s, kh, d)),
            jax.random.normal(ks[2], (b, s, kh, d)))


def test_causal_query_chunks(monkeypatch):
    monkeypatch.setattr(sa, "QUERY_CHUNK", 16)
    q, k, v = data(2, 70, 70)
    valid = jnp.arange(70)[None, :] >= jnp.array([[0], [5]])  # second row left-padded
    out = sa.attend(q, k, v, q_slot_L=jnp.arange(70), kv_valid_BxS=valid, causal_prefix=True)
    ref = reference(q, k, v, np.arange(70), valid)
    np.testing.assert_allclose(np.asarray(out)[1, 5:], ref[1, 5:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out)[0], ref[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("filled", [3, 40, 100])
def test_blocked_online_softmax_over_a_long_cache(monkeypatch, filled):
    monkeypatch.setattr(sa, "DIRECT_MAX_KEYS", 16)
    monkeypatch.setattr(sa, "KEY_BLOCK", 16)
    q, k, v = data(2, 3, 100, seed=filled)
    slots = jnp.arange(filled - 3, filled)
    valid = (jnp.arange(100) < filled)[None, :].repeat(2, 0).at[1, :2].set(False)
    got = jax.jit(lambda q, k, v, n: sa.attend(q, k, v, q_slot_L=slots, kv_valid_BxS=valid, num_slots=n))(
        q, k, v, jnp.asarray(filled))
    ref = reference(q, k, v, np.asarray(slots), valid)
    seen = np.isfinite(ref)  # a query with no visible key (row 1 at filled=3) has no defined output
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got)[seen], ref[seen], rtol=1e-5, atol=1e-5)
