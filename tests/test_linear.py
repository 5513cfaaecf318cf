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


YNN = "__ynn_fusion"


def test_engine_programs_compile_without_the_ynnpack_dot_fusion():
    """The engine's prefill and decode jits carry `XLA_CPU_COMPILER_OPTIONS`: on CPU their compiled programs hold
    no YNNPACK fusion where a plain jit of the same prefill chunk has one (the MoE's expert tiles), and both
    give the same logits to fp32 rounding."""
    if jax.default_backend() != "cpu":
        pytest.skip("an XLA:CPU option")
    from flax import nnx

    from m1jax import generation
    from m1jax.cache import init_cache
    from m1jax.config import ModelConfig
    from m1jax.model import MiniMaxM1

    assert generation._decode_loop._jit_info.compiler_options_kvs == tuple(unfused.XLA_CPU_COMPILER_OPTIONS.items())
    config = ModelConfig.from_preset("tiny")
    graphdef, params = nnx.split(MiniMaxM1(config, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 64), 0, config.vocab_size)

    def args():  # a fresh cache each time: the engine's jit donates it
        return graphdef, params, init_cache(config, 1, 128), tokens, jnp.arange(64)[None], jnp.ones((1, 64), bool)

    plain = jax.jit(generation.forward_chunk, static_argnums=(0,)).lower(*args()).compile()
    if YNN not in plain.as_text():
        pytest.skip("this XLA:CPU does not use YNNPACK for these dots")
    engine = generation._forward_chunk.lower(*args()).compile()
    assert YNN not in engine.as_text()
    np.testing.assert_allclose(engine(*args()[1:])[1], plain(*args()[1:])[1], rtol=1e-5, atol=1e-5)
