"""The pure-JAX lightning attention: blocked (the XLA path) == recurrence == naive quadratic form; state hand-off."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from m1jax.pallas_kernels.lightning import (
    lightning_attention,
    lightning_attention_blocked,
    lightning_attention_naive,
    lightning_attention_recurrent,
    lightning_decode_reference,
)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def inputs(b, t, h, d, seed=0, dtype=jnp.float32, state=True):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v = (jax.random.normal(x, (b, t, h, d), jnp.float32).astype(dtype) for x in ks[:3])
    s0 = jax.random.normal(ks[3], (b, h, d, d), jnp.float32) if state else None
    slope = jnp.asarray(np.geomspace(0.92, 0.0039, h), jnp.float32)
    return q, k, v, slope, s0


@pytest.mark.parametrize("t, block", [(1, 8), (7, 4), (37, 8), (64, 16), (100, 256), (257, 64)])
@pytest.mark.parametrize("with_state", [False, True])
def test_blocked_equals_recurrent_and_naive(t, block, with_state):
    q, k, v, slope, s0 = inputs(2, t, 3, 16, seed=t, state=with_state)
    out_r, fin_r = lightning_attention_recurrent(q, k, v, slope, s0)
    out_n, fin_n = lightning_attention_naive(q, k, v, slope, s0)
    out_b, fin_b = lightning_attention_blocked(q, k, v, slope, s0, block_size=block)
    chex.assert_shape(out_b, q.shape)
    chex.assert_type(fin_b, jnp.float32)
    for out, fin in ((out_n, fin_n), (out_b, fin_b)):
        assert rel(out, out_r) <= 1e-5
        assert rel(fin, fin_r) <= 1e-5


def test_slope_near_zero_and_m1_extremes():
    q, k, v, _, s0 = inputs(1, 300, 4, 8, seed=3)
    slope = jnp.asarray([1e-7, 0.0039, 0.5, 0.92], jnp.float32)
    ref = lightning_attention_recurrent(q, k, v, slope, s0)
    got = lightning_attention_blocked(q, k, v, slope, s0, block_size=256)
    assert rel(got[0], ref[0]) <= 1e-5 and rel(got[1], ref[1]) <= 1e-5


@pytest.mark.parametrize("split", [1, 5, 8, 13, 31])
def test_split_anywhere_and_carry_the_state(split):
    q, k, v, slope, s0 = inputs(2, 32, 2, 8, seed=11)
    full_out, full_fin = lightning_attention_blocked(q, k, v, slope, s0, block_size=8)
    o1, st = lightning_attention_blocked(q[:, :split], k[:, :split], v[:, :split], slope, s0, block_size=8)
    o2, fin = lightning_attention_blocked(q[:, split:], k[:, split:], v[:, split:], slope, st, block_size=8)
    assert rel(jnp.concatenate([o1, o2], 1), full_out) <= 1e-5
    assert rel(fin, full_fin) <= 1e-5


def test_decode_steps_continue_a_prefill():
    q, k, v, slope, s0 = inputs(2, 20, 3, 8, seed=5)
    full_out, full_fin = lightning_attention_recurrent(q, k, v, slope, s0)
    out, state = lightning_attention_blocked(q[:, :17], k[:, :17], v[:, :17], slope, s0, block_size=8)
    outs = [out]
    for i in range(17, 20):
        o, state = lightning_decode_reference(q[:, i], k[:, i], v[:, i], slope, state)
        outs.append(o[:, None])
    assert rel(jnp.concatenate(outs, 1), full_out) <= 1e-5
    assert rel(state, full_fin) <= 1e-5


def test_xla_path_gradients_match_recurrence():
    q, k, v, slope, s0 = inputs(1, 19, 2, 8, seed=2)

    def loss(fn, *args):
        out, fin = fn(*args)
        return jnp.sum(out * jnp.cos(out)) + jnp.sum(fin ** 2) * 1e-2

    args = (q, k, v, slope, s0)
    g_ref = jax.grad(lambda *a: loss(lightning_attention_recurrent, *a), argnums=(0, 1, 2, 4))(*args)
    g_blk = jax.grad(lambda *a: loss(lambda *x: lightning_attention_blocked(*x, block_size=8), *a),
                     argnums=(0, 1, 2, 4))(*args)
    for a, b in zip(g_blk, g_ref, strict=True):
        assert rel(a, b) <= 1e-5


def test_bf16_inputs_report_relative_error():
    q, k, v, slope, s0 = inputs(1, 300, 4, 64, seed=9, dtype=jnp.bfloat16)
    ref_out, ref_fin = lightning_attention_recurrent(*(x.astype(jnp.float32) for x in (q, k, v)), slope, s0)
    out, fin = lightning_attention(q, k, v, slope, s0, impl="xla")
    assert out.dtype == jnp.bfloat16 and fin.dtype == jnp.float32
    err_out, err_fin = rel(out, ref_out), rel(fin, ref_fin)
    print(f"bf16 lightning XLA path: out rel err {err_out:.2e}, final state rel err {err_fin:.2e}")
    assert err_out < 1e-2 and err_fin < 1e-5  # output rounding to bf16 only; the state stays fp32


def test_bad_shapes_are_rejected():
    q, k, v, slope, s0 = inputs(1, 4, 2, 8)
    with pytest.raises(ValueError, match="slope"):
        lightning_attention_blocked(q, k, v, slope[:1], s0)
    with pytest.raises(ValueError, match="initial_state"):
        lightning_attention_blocked(q, k, v, slope, s0[:, :1])
    with pytest.raises(ValueError, match="impl"):
        lightning_attention(q, k, v, slope, impl="cuda")
