"""Sampling filters on hand-made logits (exact masks), temperature, per-row parameters, seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.sampling import SamplingParams, filter_logits, sample_tokens, step_keys

LOGITS = jnp.log(jnp.asarray([[0.05, 0.4, 0.1, 0.25, 0.2]]))  # probabilities 0.05 .4 .1 .25 .2


def kept(z):
    return np.isfinite(np.asarray(z))[0].tolist()


def run(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, logits=LOGITS):
    b = logits.shape[0]
    return filter_logits(logits, jnp.full((b,), temperature), jnp.full((b,), top_k, jnp.int32), jnp.full((b,), top_p),
                         jnp.full((b,), min_p))


def test_top_k_keeps_the_k_largest():
    assert kept(run(top_k=2)) == [False, True, False, True, False]
    assert kept(run(top_k=1)) == [False, True, False, False, False]
    assert kept(run(top_k=0)) == [True] * 5
    assert kept(run(top_k=50)) == [True] * 5


@pytest.mark.parametrize("top_p, expected", [
    (0.39, [False, True, False, False, False]),  # 0.4 alone reaches 0.39
    (0.41, [False, True, False, True, False]),  # needs 0.25 too
    (0.65, [False, True, False, True, False]),
    (0.66, [False, True, False, True, True]),
    (0.9, [False, True, True, True, True]),
    (1.0, [True] * 5),
])
def test_top_p_keeps_the_smallest_nucleus_reaching_p(top_p, expected):
    assert kept(run(top_p=top_p)) == expected


def test_min_p_is_relative_to_the_top_probability():
    assert kept(run(min_p=0.5)) == [False, True, False, True, True]  # p ≥ 0.2
    assert kept(run(min_p=0.6)) == [False, True, False, True, False]  # p ≥ 0.24
    assert kept(run(min_p=1.0)) == [False, True, False, False, False]


def test_temperature_scales_then_filters_compose():
    z = run(temperature=0.5)
    np.testing.assert_allclose(np.asarray(z), np.asarray(LOGITS) / 0.5, rtol=1e-6)
    # top-p runs on the top-k-filtered, tempered distribution
    assert kept(run(top_k=2, top_p=0.7)) == [False, True, False, True, False]
    assert kept(run(top_k=3, top_p=0.5)) == [False, True, False, True, False]  # 0.4/0.85 = 0.47 < 0.5
    assert kept(run(top_k=3, top_p=0.47)) == [False, True, False, False, False]  # 0.4706 ≥ 0.47


def test_ties_at_the_threshold_are_kept():
    z = jnp.log(jnp.asarray([[0.3, 0.3, 0.2, 0.2]]))
    assert kept(run(top_k=1, logits=z)) == [True, True, False, False]


def test_rows_have_their_own_parameters():
    z = jnp.concatenate([LOGITS, LOGITS])
    out = filter_logits(z, jnp.array([1.0, 1.0]), jnp.array([1, 0], jnp.int32), jnp.array([1.0, 0.66]),
                        jnp.array([0.0, 0.0]))
    assert np.isfinite(np.asarray(out)).tolist() == [[False, True, False, False, False],
                                                     [False, True, False, True, True]]


def test_sampling_frequencies_and_logprobs():
    n = 4000
    logits = jnp.tile(LOGITS, (n, 1))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(n))
    ones = jnp.ones(n)
    toks, model_lp, sample_lp = sample_tokens(keys, logits, ones, jnp.zeros(n, jnp.int32), jnp.full(n, 0.66),
                                              jnp.zeros(n))
    freq = np.bincount(np.asarray(toks), minlength=5) / n
    np.testing.assert_allclose(freq, [0, 0.4 / 0.85, 0, 0.25 / 0.85, 0.2 / 0.85], atol=0.03)
    np.testing.assert_allclose(np.exp(np.asarray(model_lp)), np.array([.05, .4, .1, .25, .2])[np.asarray(toks)],
                               rtol=1e-5)
    np.testing.assert_allclose(np.exp(np.asarray(sample_lp)), (np.array([0, .4, 0, .25, .2]) / .85)[np.asarray(toks)],
                               rtol=1e-5)


def test_greedy_rows_and_same_seed_same_tokens():
    logits = jax.random.normal(jax.random.PRNGKey(1), (3, 50))
    temp = jnp.array([0.0, 1.0, 1.0])
    args = (temp, jnp.zeros(3, jnp.int32), jnp.ones(3), jnp.zeros(3))
    keys = step_keys(jnp.array([7, 7, 8], jnp.uint32), jnp.asarray(3))
    a, lp, slp = sample_tokens(keys, logits, *args)
    b, _, _ = sample_tokens(keys, logits, *args)
    assert a.tolist() == b.tolist()
    assert int(a[0]) == int(jnp.argmax(logits[0]))
    assert float(slp[0]) == pytest.approx(float(lp[0]))  # greedy: the model's probability
    other = [sample_tokens(step_keys(jnp.array([7, 7, s], jnp.uint32), jnp.asarray(3)), logits, *args)[0][2]
             for s in range(8, 20)]
    assert len(set(int(x) for x in other)) > 1  # different seeds, different samples


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"min_p": -0.1}, "min_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"repetition_stop": 0}, "repetition_stop"),
    ({"repetition_threshold": 1.0}, "repetition_threshold"), ({"stop_strings": ("",)}, "stop_strings"),
])
def test_bad_sampling_values_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
