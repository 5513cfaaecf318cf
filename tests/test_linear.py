"""`linear`: the projections' matrix product, split along K for decode-sized inputs on CPU — equal to einsum."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.modules import unfused


@pytest.mark.parametrize("rows", [1, 2, 3, 8])
def test_linear_equals_einsum(rows):
    kx, kw, ko = jax.random.split(jax.random.PRNGKey(rows), 3)
    x = jax.random.normal(kx, (1, rows, 64))
    w = jax.random.normal(kw, (64, 4, 12))  # [D, H, K] like qkv_proj
    got = jax.jit(unfused.linear)(x, w)
    chex.assert_shape(got, (1, rows, 4, 12))
    np.testing.assert_allclose(got, jnp.einsum("bld,dhk->blhk", x, w), rtol=1e-5, atol=1e-5)
    o = jax.random.normal(ko, (4, 12, 64))  # [H, K, D] like out_proj: two contracting axes
    got2 = jax.jit(lambda a, b: unfused.linear(a, b, contract=2))(got, o)
    np.testing.assert_allclose(got2, jnp.einsum("blhk,hkd->bld", got, o), rtol=1e-5, atol=1e-4)


def test_linear_splits_only_small_products_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("the split applies on CPU only")
    x1, x8, w = jnp.ones((1, 64)), jnp.ones((8, 64)), jnp.ones((64, 32))
    assert "optimization_barrier" in str(jax.make_jaxpr(unfused.linear)(x1, w))
    assert "optimization_barrier" not in str(jax.make_jaxpr(unfused.linear)(x8, w))


def test_linear_names_a_shape_mismatch():
    with pytest.raises(ValueError, match="contracting shapes differ"):
        unfused.linear(jnp.ones((2, 5)), jnp.ones((6, 3)))
