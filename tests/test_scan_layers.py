"""Layers as a scan (`m1jax.layer_stack`): the scanned model computes what the unrolled one computes (values,
caches, generation, gradients under every remat policy), and every layout users see stays per layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1jax.cache import Cache, init_cache
from m1jax.config import ConfigError, ModelConfig
from m1jax.generation import Engine, load_state, save_state
from m1jax.layer_stack import STACKED, layer_path, per_layer_arrays
from m1jax.loading import build_from_views
from m1jax.model import MiniMaxM1
from m1jax.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=(), repetition_stop=None)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def kinds(pattern: str) -> tuple[str, ...]:
    return tuple("full_attention" if k == "S" else "linear_attention" for k in pattern)


def small(pattern: str, **kw) -> ModelConfig:
    types = kinds(pattern)
    return ModelConfig.from_preset("tiny-hf").replace(num_hidden_layers=len(types), layer_types=types, block_size=8,
                                                      hf_source_json="{}", **kw)


def pair(config: ModelConfig, seed=0):
    """(scanned model, unrolled model) with the same weights (the unrolled one built from per-layer views)."""
    scanned = MiniMaxM1(config.replace(scan_layers=True), rngs=nnx.Rngs(seed))
    flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(scanned))}
    unrolled = build_from_views(config.replace(scan_layers=False), per_layer_arrays(scanned.config, flat))
    return scanned, unrolled


@pytest.fixture(scope="module")
def models():
    return pair(small("LLSLLS"))  # period 3, 2 groups


@pytest.fixture(scope="module")
def small_models():
    return pair(small("LSLS"), seed=1)  # period 2, 2 groups: a cheaper compile for the gradient tests


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, 500, (2, 21)))


# ------------------------------------------------------------------------------------------------ config
def test_period_and_groups_follow_layer_types():
    m1 = ModelConfig.from_preset("minimax-m1-80k")
    assert (m1.layer_period, m1.scan_groups) == (8, 10)
    assert m1.replace(scan_layers=False).scan_groups == 0
    c = small("LLSLLS")
    assert (c.layer_period, c.scan_groups) == (3, 2)
    aperiodic = small("LLSLS")  # no period short of the whole stack: one group
    assert (aperiodic.layer_period, aperiodic.scan_groups) == (5, 0)
    assert aperiodic.replace(scan_layers=True).scan_groups == 1
    assert small("LLLL").layer_period == 1 and small("LLLL").scan_groups == 4


def test_bad_scan_and_remat_values_name_the_field():
    with pytest.raises(ConfigError, match="'scan_layers'"):
        small("LSLS", scan_layers="yes")
    with pytest.raises(ConfigError, match="'remat'"):
        small("LSLS", remat="everything")


# ------------------------------------------------------------------------------------------------ layout
def test_parameters_are_stacked_once_and_map_to_per_layer_names(models):
    scanned, unrolled = models
    state = dict(nnx.to_flat_state(nnx.state(scanned)))
    assert not any(p[0] == "layers" for p in state)
    qkv = state[(STACKED, 1, "self_attn", "qkv_proj")]
    assert qkv.get_value().shape[0] == 2 and qkv.get_metadata()["logical_axes"][0] == "layers"
    assert layer_path(scanned.config, (STACKED, 1, "self_attn", "qkv_proj"), 1) == ("layers", 4, "self_attn",
                                                                                   "qkv_proj")
    per_layer = per_layer_arrays(scanned.config, {p: v.get_value() for p, v in state.items()})
    expected = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(unrolled))}
    assert set(per_layer) == set(expected)
    for p in expected:
        np.testing.assert_array_equal(per_layer[p], expected[p], err_msg=str(p))
    np.testing.assert_array_equal(scanned.layer(4).self_attn.qkv_proj[...], unrolled.layers[4].self_attn.qkv_proj[...])
    np.testing.assert_array_equal(scanned.layer(4).self_attn.slopes, unrolled.layers[4].self_attn.slopes)


def test_cache_is_stacked_per_group_with_a_per_layer_view():
    c = small("LLSLLS", scan_layers=True)
    cache = init_cache(c, 2, 16)
    assert cache.groups == 2 and len(cache.layers) == 3
    assert cache.layers[0].shape == (2, 2, 4, 16, 16) and cache.layers[2][0].shape == (2, 2, 16, 2, 16)
    flat = init_cache(c.replace(scan_layers=False), 2, 16)
    rng = np.random.default_rng(1)
    layers = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), flat.layers)
    stacked = Cache.from_per_layer(layers, flat.valid_BxS, flat.length, groups=2)
    for a, b in zip(stacked.per_layer(), layers, strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    grown = stacked.map_slots(lambda x, axis: jnp.concatenate([x, x], axis=axis))
    assert grown.max_len == 32 and grown.per_layer()[5][0].shape == (2, 32, 2, 16)


# ------------------------------------------------------------------------------------------------ values
def test_forward_equals_unrolled(models, tokens):
    scanned, unrolled = models
    valid = jnp.arange(21)[None, :] >= jnp.asarray([[0], [5]])
    a = jax.jit(lambda t, v: scanned(t, valid_BxL=v, return_routing=True))(tokens, valid)
    b = jax.jit(lambda t, v: unrolled(t, valid_BxL=v, return_routing=True))(tokens, valid)
    assert rel(a.logits, b.logits) <= 1e-6
    assert len(a.lightning_states) == len(b.lightning_states) == 4
    for x, y in zip(a.lightning_states, b.lightning_states, strict=True):
        assert rel(x, y) <= 1e-6
    assert len(a.routing) == 6
    for x, y in zip(a.routing, b.routing, strict=True):
        for k in y:
            np.testing.assert_allclose(x[k], y[k], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_cached_decode_equals_unrolled_and_full_forward(models, tokens):
    scanned, unrolled = models
    full = np.asarray(jax.jit(lambda t: unrolled(t).logits)(tokens))
    outs = []
    for m in models:
        step = jax.jit(lambda t, c, m=m: m(t, cache=c))
        out = step(tokens[:, :13], init_cache(m.config, 2, 32))
        logits = [out.logits]
        for i in range(13, 21):
            out = step(tokens[:, i:i + 1], out.cache)
            logits.append(out.logits)
        outs.append((np.concatenate(logits, 1), out.cache))
    (ls, cs), (lu, cu) = outs
    assert rel(ls, lu) <= 1e-6 and rel(ls, full) <= 1e-5
    for x, y in zip(cs.per_layer(), cu.per_layer(), strict=True):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), x, y)


@pytest.mark.slow
def test_generation_and_saved_state_equal_unrolled(models, tmp_path):
    scanned, unrolled = models
    prompts = [[5, 9, 2], list(range(40, 57)), [7] * 9]
    engine = Engine(scanned, prefill_chunk=8)
    state = engine.prefill(prompts)
    save_state(state, tmp_path / "s")
    resumed = load_state(tmp_path / "s", scanned.config)
    assert resumed.cache.groups == 2
    got = engine.decode(resumed, GREEDY)[0]
    ref = Engine(unrolled, prefill_chunk=8).generate(prompts, GREEDY)
    for r, e in zip(got, ref, strict=True):
        assert r.tokens == e.tokens
        np.testing.assert_allclose(r.logprobs, e.logprobs, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_unstacked_experts_of_a_scanned_model_give_the_same_decode(models):
    from m1jax.modules.moe import unstack_experts

    scanned, _ = models
    graphdef, params = nnx.split(scanned)
    unstacked = unstack_experts(params)
    w1 = unstacked[STACKED][0]["block_sparse_moe"]["w1"].get_value()
    assert isinstance(w1, tuple) and len(w1) == scanned.config.num_local_experts and w1[0].shape[0] == 2
    tok = jnp.asarray([[3]])
    fwd = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t).logits)
    np.testing.assert_allclose(fwd(unstacked, tok), fwd(params, tok), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------- gradients
def _loss(model, tokens):
    out = model(tokens[:, :-1], return_routing=True)
    logp = jax.nn.log_softmax(out.logits, -1)
    nll = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
    return nll + 0.01 * sum(s["aux_loss"] for s in out.routing)


def _grads(model, tokens):
    graphdef, params = nnx.split(model)
    loss, g = jax.jit(jax.value_and_grad(lambda p, t: _loss(nnx.merge(graphdef, p), t)))(params, tokens)
    return float(loss), per_layer_arrays(model.config, {p: v.get_value() for p, v in nnx.to_flat_state(g)})


@pytest.mark.parametrize("policy", [pytest.param("none", marks=pytest.mark.slow), "full",
                                    pytest.param("save_dots", marks=pytest.mark.slow)])
def test_gradients_equal_unrolled_under_each_remat_policy(small_models, tokens, policy):
    scanned, unrolled = small_models
    loss_s, gs = _grads(_with_remat(scanned, policy), tokens)
    loss_u, gu = _grads(_with_remat(unrolled, "none"), tokens)
    assert abs(loss_s - loss_u) <= 1e-6 * abs(loss_u)
    assert set(gs) == set(gu)
    for p in gu:
        assert rel(gs[p], gu[p]) <= 1e-5, p


def _with_remat(model, policy):
    """The same parameters under a config with remat `policy`."""
    graphdef, state = nnx.split(model)
    m = nnx.merge(graphdef, state)
    m.config = model.config.replace(remat=policy)
    return m


def test_remat_is_applied_and_offload_is_refused_on_cpu(models, tokens):
    scanned, _ = models
    jaxpr = str(jax.make_jaxpr(lambda t: _with_remat(scanned, "full")(t).logits)(tokens))
    assert "checkpoint" in jaxpr or "remat" in jaxpr
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="'remat': 'offload'"):
            jax.eval_shape(lambda t: _with_remat(scanned, "offload")(t).logits, tokens)


# --------------------------------------------------------------------------------------------- program size
def test_scanned_program_does_not_grow_with_the_layer_count():
    """The lowered program of a scanned model is the same size for 2 and 6 groups; unrolled it grows ~3×."""
    def size(pattern, scan):
        c = small(pattern, scan_layers=scan)
        model = nnx.eval_shape(lambda: MiniMaxM1(c, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        f = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t).logits)
        return len(f.lower(state, jax.ShapeDtypeStruct((1, 8), jnp.int32)).as_text())

    assert size("LSLSLSLSLSLS", True) <= 1.05 * size("LSLS", True)
    assert size("LSLSLSLSLSLS", False) >= 2.5 * size("LSLS", False)


# ------------------------------------------------------------------------------------------------- train
def test_weight_decay_mask_counts_axes_per_layer(models):
    """AdamW decays matrices only: a scanned model's stacked norms `[G, D]` are not matrices."""
    from m1jax.train.optim import _decay_mask

    def decayed(model):
        params = nnx.state(model, nnx.Param)
        flat = {p: v.get_value() for p, v in nnx.to_flat_state(_decay_mask(params))}
        return {p: bool(np.all(v)) for p, v in per_layer_arrays(model.config, flat,
                                                                  take=lambda x, g: x).items()}

    scanned, unrolled = models
    mask = decayed(scanned)
    assert mask == decayed(unrolled)
    assert not mask[("layers", 3, "input_layernorm")] and mask[("layers", 3, "block_sparse_moe", "w1")]


def test_scanned_decode_updates_the_cache_in_place():
    """One decode step of a scanned model (3 groups, 8192 cache slots) moves at most twice the bytes of its
    weights and cache (counted on the compiled HLO, loops × trip counts): each group's K/V is written at the
    new slot of the stacks and read from there, never copied out of the stacks and back (which cost ≈ 10×)."""
    from m1jax import generation, hlo_collectives
    from m1jax.cache import abstract_cache

    config = small("LLS" * 3, scan_layers=True)
    graphdef, state = nnx.split(MiniMaxM1(config, rngs=nnx.Rngs(0)))
    cache = abstract_cache(config, 2, 8192)
    held = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((cache.layers, state)))
    tok = jax.ShapeDtypeStruct((2, 1), jnp.int32)
    hlo = generation._forward_chunk.lower(graphdef, state, cache, tok, tok,
                                          jax.ShapeDtypeStruct((2, 1), jnp.bool_)).compile().as_text()
    assert hlo_collectives.program_cost(hlo)["hbm bytes"] < 2 * held


@pytest.mark.parametrize("mesh_shape", [None, pytest.param({"expert": 4, "tensor": 2}, marks=pytest.mark.slow)])
def test_expert_weights_held_per_group_give_the_same_cached_decode(models, tokens, mesh_shape):
    """`unstack_experts(over="groups")` (what a TPU/GPU engine decodes a scanned model with): each group's MoE
    reads its own arrays through a `lax.switch` on the group index; prefill and a cached decode step give
    exactly the stacked model's logits and cache, on one device and expert-parallel on a mesh."""
    from m1jax.generation import decode_expert_layout
    from m1jax.modules.moe import PerGroup, unstack_experts
    from m1jax.sharding import make_mesh

    scanned, unrolled = models
    config = scanned.config
    assert decode_expert_layout(config, 8, "tpu") == "groups"
    assert decode_expert_layout(unrolled.config, 8, "tpu") is None
    graphdef, params = nnx.split(scanned)
    per_group = unstack_experts(params, over="groups")
    w1 = per_group[STACKED][0]["block_sparse_moe"]["w1"].get_value()
    assert isinstance(w1, PerGroup) and len(w1.arrays) == config.scan_groups
    assert w1.arrays[1].shape[0] == config.num_local_experts
    assert unstack_experts(nnx.split(unrolled)[1], over="groups") is not None  # nothing stacked: unchanged

    def run(p):
        model = nnx.merge(graphdef, p)
        out = model(tokens[:, :-1], cache=init_cache(config, 2, 32), logits="last")
        step = model(tokens[:, -1:], cache=out.cache, logits="last")
        return out.logits, step.logits, step.cache

    if mesh_shape is None:
        ref, got = jax.jit(run)(params), jax.jit(run)(per_group)
    else:
        with jax.set_mesh(make_mesh(mesh_shape)):
            ref, got = jax.jit(run)(params), jax.jit(run)(per_group)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
