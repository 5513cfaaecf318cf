"""Sharded inference on 8 CPU devices: abstract-first model init, the cache created in its sharding, the engine
on a data × tensor × expert mesh (same greedy tokens as on one device)."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from m1jax.cache import abstract_cache, cache_shardings, init_cache
from m1jax.config import ModelConfig
from m1jax.generation import Engine
from m1jax.loading import abstract_sharded_model, init_sharded
from m1jax.model import MiniMaxM1
from m1jax.sampling import SamplingParams
from m1jax.sharding import logical_to_spec, make_mesh

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8, stop_token_ids=(), repetition_stop=None)


@pytest.fixture(scope="module")
def config():
    return ModelConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def mesh():
    return make_mesh({"data": 2, "tensor": 2, "expert": 2})


def _flat(model):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(model))}


def test_init_sharded_equals_unsharded_init_and_follows_the_rules(config, mesh):
    sharded = _flat(init_sharded(config, mesh, seed=3))
    eager = _flat(MiniMaxM1(config, rngs=nnx.Rngs(3)))
    jitted = jax.jit(lambda: nnx.state(MiniMaxM1(config, rngs=nnx.Rngs(3))))()
    jitted = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(jitted)}
    _, abstract = abstract_sharded_model(config, mesh)
    axes = {jax.tree_util.keystr(p): v.get_metadata()["logical_axes"] for p, v in jax.tree_util.tree_leaves_with_path(
        abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))}
    abstract = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
    assert set(sharded) == set(eager) == set(abstract)
    for name, x in sharded.items():
        # the same program as the unsharded jitted init, bit for bit; eager init differs in the last ulp
        np.testing.assert_array_equal(np.asarray(x), np.asarray(jitted[name]), err_msg=name)
        np.testing.assert_allclose(np.asarray(x), np.asarray(eager[name]), rtol=1e-6, atol=1e-9, err_msg=name)
        expected = logical_to_spec(axes[name[:-len(".value")]], x.shape, mesh)
        assert x.sharding.spec == expected, name
        assert abstract[name].sharding.spec == expected and abstract[name].shape == x.shape, name
    w1 = sharded["['layers'][0]['block_sparse_moe']['w1'].value"]
    assert w1.sharding.spec == P("expert", None, "tensor")
    assert w1.addressable_shards[0].data.shape == (2, 64, 48)  # [4, 64, 96] split 2 × 2: each device a quarter
    assert sharded["['lm_head'].value"].sharding.spec == P(None, "tensor")


def test_cache_is_created_in_its_sharding(config, mesh):
    cache = init_cache(config, 4, 256, mesh=mesh)
    expected = cache_shardings(config, 4, 256, mesh)
    for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(expected), strict=True):
        assert got.sharding == want
        assert not np.any(np.asarray(got))
    kv = cache.layers[config.softmax_layers[0]][0]
    state = cache.layers[config.lightning_layers[0]]
    assert kv.shape == (4, 256, 2, 16) and kv.sharding.spec[2] == "tensor"
    assert kv.addressable_shards[0].data.shape[0] < 4  # batch split over the data axis
    assert state.sharding.spec[1] == "tensor"
    abstract = abstract_cache(config, 4, 256, mesh=mesh)
    assert jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), abstract) == \
        jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), cache)


@pytest.mark.slow  # prefill and decode compiled for a mesh (~20 s)
def test_engine_on_a_mesh_generates_the_same_greedy_tokens(config, mesh):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (5, 17, 9, 30)]
    model = MiniMaxM1(config, rngs=nnx.Rngs(0))
    ref = Engine(model).generate(prompts, GREEDY)
    engine = Engine(init_sharded(config, mesh, seed=0), mesh=mesh)
    state = engine.prefill(prompts, reserve=GREEDY.max_new_tokens)
    for got, want in zip(jax.tree.leaves(state.cache), jax.tree.leaves(
            cache_shardings(config, 4, state.cache.max_len, mesh)), strict=True):
        assert got.sharding.is_equivalent_to(want, got.ndim)
    out, _ = engine.decode(state, GREEDY)
    assert [r.tokens for r in out] == [r.tokens for r in ref]
    for r, q in zip(out, ref):
        np.testing.assert_allclose(r.logprobs, q.logprobs, rtol=1e-4, atol=1e-5)


def test_decode_step_on_an_inference_mesh_gathers_no_weights(config):
    """One decode step on data × tensor × expert moves only activations: every all-gather in the compiled
    program is smaller than an eighth of every weight of ≥ 64K elements (a gathered weight, even a partial one
    over one axis of this 8-device mesh, would be at least that): projections, experts, embedding, LM head."""
    from m1jax import hlo_collectives
    from m1jax.plan import lower_step

    big = config.replace(hidden_size=256, intermediate_size=256, vocab_size=1024, num_attention_heads=8,
                         head_dim=32, moe_impl="ragged")
    mesh = make_mesh({"data": 2, "tensor": 2, "expert": 2})
    with jax.set_mesh(mesh):
        hlo = lower_step(big, "decode", 4, 256, mesh).compile().as_text()
    _, abstract = abstract_sharded_model(big, mesh)
    smallest = min(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract) if x.size >= 65536)
    gathers = [c for c in hlo_collectives.collectives(hlo) if c.kind == "all-gather"]
    assert all(c.bytes < smallest / 8 for c in gathers), (smallest, sorted(c.bytes for c in gathers)[-3:])
    assert hlo_collectives.counts_by_kind(hlo)["all-reduce"] > 0  # tensor parallelism is really there
