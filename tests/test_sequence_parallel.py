"""Sequence sharding (batch 1–2 at long context): the sequence split over the data axes of 8-device CPU meshes
computes what one device computes — lightning layers (LASP state prefix), softmax layers (gathered K/V for
prefill, partial softmaxes combined over a sequence-sharded cache for decode), and the whole model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1jax.cache import KV_AXES, init_cache
from m1jax.config import ModelConfig
from m1jax.generation import Engine
from m1jax.loading import build_from_views
from m1jax.model import MiniMaxM1
from m1jax.modules import softmax_attention as sa
from m1jax.modules.lightning import LightningAttention
from m1jax.modules.rope import rope_tables
from m1jax.modules.softmax_attention import SoftmaxAttention
from m1jax.sampling import SamplingParams
from m1jax.sharding import logical_to_spec, make_mesh, spec_axes

MESHES = [{"data": 8}, {"fsdp": 4, "tensor": 2}, {"data": 2, "expert": 4}]
# (mesh, batch): the default run covers every mesh and both batch sizes; the full grid is marked slow.
FAST = [(MESHES[0], 1), (MESHES[1], 2), (MESHES[2], 2)]


def _grid(fast):
    return [pytest.param(m, b, marks=() if (m, b) in fast else pytest.mark.slow,
                         id="-".join(f"{k}{v}" for k, v in m.items()) + f"-batch{b}") for m in MESHES for b in (1, 2)]


GRID, MODEL_GRID = _grid(FAST), _grid(FAST[2:])
TOL = dict(rtol=2e-5, atol=2e-5)
CONFIG = ModelConfig.from_preset("tiny").replace(
    num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2,
    layer_types=("linear_attention", "full_attention"))


def _manual(fn, *args):
    text = jax.jit(fn).lower(*args).as_text()
    return "sdy.manual_computation" in text or "shard_map" in text


def _valid(b, l, pads=(0, 5)):
    return jnp.arange(l)[None, :] >= jnp.asarray(pads[:b])[:, None]


@pytest.mark.parametrize(("mesh_shape", "b"), GRID)
def test_lightning_layer(mesh_shape, b):
    """From a zero state, and carrying a nonzero state across a left-padded chunk: outputs and final state."""
    layer = LightningAttention(CONFIG, 1, rngs=nnx.Rngs(0))
    ks = jax.random.split(jax.random.PRNGKey(b), 2)
    x = jax.random.normal(ks[0], (b, 64, CONFIG.hidden_size))
    s0 = 0.3 * jax.random.normal(ks[1], (b, 8, 16, 16))
    valid = _valid(b, 64, (13, 0))

    def fresh(x):
        return layer(x)

    def carried(x, s0, valid):
        return layer(x, valid_BxL=valid, state_BxHxDxD=s0)

    expected = jax.jit(fresh)(x) + jax.jit(carried)(x, s0, valid)
    with jax.set_mesh(make_mesh(mesh_shape)):
        assert _manual(fresh, x)
        got = jax.jit(fresh)(x) + jax.jit(carried)(x, s0, valid)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), **TOL)


@pytest.mark.parametrize(("mesh_shape", "b"), GRID)
def test_softmax_layer(mesh_shape, b):
    """Causal prefill without a cache, prefill into a cache at slot 16 (earlier slots filled), one decode step."""
    _check_softmax_layer(mesh_shape, b)


def test_softmax_layer_in_query_and_key_blocks(monkeypatch):
    """The long-context paths: each shard's queries in blocks, keys visited blockwise with an online softmax."""
    monkeypatch.setattr(sa, "QUERY_BLOCK", 8)
    monkeypatch.setattr(sa, "DIRECT_MAX_KEYS", 16)
    monkeypatch.setattr(sa, "KEY_BLOCK", 16)
    _check_softmax_layer({"fsdp": 2, "tensor": 4}, 1)


def _check_softmax_layer(mesh_shape, b):
    layer = SoftmaxAttention(CONFIG, 3, rngs=nnx.Rngs(0))
    ks = jax.random.split(jax.random.PRNGKey(10 + b), 5)
    l, s = 32, 64
    x = jax.random.normal(ks[0], (b, l, CONFIG.hidden_size))
    x1 = jax.random.normal(ks[1], (b, 1, CONFIG.hidden_size))
    valid = _valid(b, l)
    kc = jax.random.normal(ks[2], (b, s, 2, 16))
    vc = jax.random.normal(ks[3], (b, s, 2, 16))
    cvalid = (jnp.arange(s) < 16 + l)[None].repeat(b, 0).at[:, 16:16 + l].set(valid).at[:, 3].set(False)

    def rope(pos):
        return rope_tables(jnp.broadcast_to(pos, (b, pos.shape[-1])), CONFIG.rope_dim, CONFIG.rope_theta)

    def prefill(x, valid):
        cos, sin = rope(jnp.arange(l))
        return layer(x, cos_BxLxR=cos, sin_BxLxR=sin, valid_BxL=valid)[0]

    def prefill_cache(x, kc, vc, cvalid, start):
        cos, sin = rope(start + jnp.arange(l))
        return layer(x, cos_BxLxR=cos, sin_BxLxR=sin, kv_cache=(kc, vc), cache_start=start, cache_valid_BxS=cvalid)

    def decode(x1, kc, vc, cvalid, start):
        cos, sin = rope(start + jnp.arange(1))
        cvalid = cvalid.at[:, start].set(True)
        return layer(x1, cos_BxLxR=cos, sin_BxLxR=sin, kv_cache=(kc, vc), cache_start=start, cache_valid_BxS=cvalid)

    start = jnp.asarray(16)
    exp_p = jax.jit(prefill)(x, valid)
    exp_c, exp_cache = jax.jit(prefill_cache)(x, kc, vc, cvalid, start)
    exp_d, exp_dcache = jax.jit(decode)(x1, *exp_cache, cvalid, start + l)
    mesh = make_mesh(mesh_shape)
    with jax.set_mesh(mesh):
        kv_sharding = logical_to_spec(KV_AXES, kc.shape, mesh)
        kc_s, vc_s = (jax.device_put(a, jax.NamedSharding(mesh, kv_sharding)) for a in exp_cache)
        assert _manual(decode, x1, kc_s, vc_s, cvalid, start + l)
        got_p = jax.jit(prefill)(x, valid)
        got_c, got_cache = jax.jit(prefill_cache)(x, kc, vc, cvalid, start)
        got_d, got_dcache = jax.jit(decode)(x1, kc_s, vc_s, cvalid, start + l)
    assert spec_axes(got_dcache[0].sharding.spec[1]), "the decode cache must stay split over the sequence"
    m = np.asarray(valid)[:, :, None]
    np.testing.assert_allclose(np.where(m, got_p, 0), np.where(m, exp_p, 0), **TOL)
    np.testing.assert_allclose(np.where(m, got_c, 0), np.where(m, exp_c, 0), **TOL)
    np.testing.assert_allclose(np.asarray(got_d), np.asarray(exp_d), **TOL)
    for g, e in zip(got_cache + got_dcache, exp_cache + exp_dcache, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), **TOL)


@pytest.fixture(scope="module")
def model_and_reference():
    model = MiniMaxM1(CONFIG, rngs=nnx.Rngs(7))
    views = {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model))}
    graphdef, _ = nnx.split(model)
    step = jax.jit(lambda params, cache, t, p, v: nnx.merge(graphdef, params)(
        t, positions_BxL=p, valid_BxL=v, cache=cache))

    def run(params, b, mesh=None):
        """Two prefill chunks of 16 (left-padded row 2), then 3 greedy decode steps; all logits and the cache."""
        rng = np.random.default_rng(b)
        tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (b, 32)))
        valid = _valid(b, 32, (0, 21))
        pos = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
        cache = init_cache(CONFIG, b, 64, mesh=mesh)
        logits = []
        for s in (0, 16):
            out = step(params, cache, tokens[:, s:s + 16], pos[:, s:s + 16], valid[:, s:s + 16])
            cache = out.cache
            logits.append(np.where(np.asarray(valid[:, s:s + 16])[..., None], out.logits, 0))
        nxt, p = jnp.argmax(out.logits[:, -1], -1), pos[:, -1] + 1
        for _ in range(3):
            out = step(params, cache, nxt[:, None], p[:, None], jnp.ones((b, 1), bool))
            cache, nxt, p = out.cache, jnp.argmax(out.logits[:, -1], -1), p + 1
            logits.append(np.asarray(out.logits))
        return logits, cache

    return model, views, run, {}


@pytest.mark.parametrize(("mesh_shape", "b"), MODEL_GRID)
def test_model_prefill_and_decode(model_and_reference, mesh_shape, b):
    model, views, run, refs = model_and_reference
    mesh = make_mesh(mesh_shape)
    sharded = build_from_views(CONFIG, views, mesh=mesh)
    with jax.set_mesh(mesh):
        logits, cache = run(nnx.state(sharded), b, mesh)
    if b not in refs:
        refs[b] = run(nnx.state(model), b)
    exp_logits, exp_cache = refs[b]
    for g, e in zip(logits, exp_logits, strict=True):
        np.testing.assert_allclose(g, e, **TOL)
    k_cache = cache.layers[CONFIG.layer_types.index("full_attention")][0]
    assert spec_axes(k_cache.sharding.spec[1]), f"K/V cache replicated over the sequence: {k_cache.sharding}"
    for g, e in zip(jax.tree.leaves(cache), jax.tree.leaves(exp_cache), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), **TOL)


@pytest.mark.slow
def test_engine_one_shot_prefill_under_a_sequence_mesh():
    """`Engine(prefill_chunk=None)` prefills a prompt in one sequence-sharded call; greedy tokens and log-probs
    equal the chunked single-device engine's."""
    model = MiniMaxM1(CONFIG, rngs=nnx.Rngs(1))
    prompt = np.random.default_rng(0).integers(0, CONFIG.vocab_size, 45).tolist()
    sp = SamplingParams(temperature=0.0, max_new_tokens=4)
    expected = Engine(model, prefill_chunk=16).generate([prompt], sp)[0]
    got = Engine(model, prefill_chunk=None, mesh=make_mesh({"data": 8})).generate([prompt], sp)[0]
    assert got.tokens == expected.tokens
    np.testing.assert_allclose(got.logprobs, expected.logprobs, rtol=1e-4, atol=1e-4)


def test_softmax_layer_gradient_through_the_key_block_loop(monkeypatch):
    """Training under a sequence-splitting mesh: the gradient of a no-cache prefill whose keys are visited
    blockwise (long context) equals the unsharded gradient."""
    monkeypatch.setattr(sa, "QUERY_BLOCK", 8)
    monkeypatch.setattr(sa, "DIRECT_MAX_KEYS", 16)
    monkeypatch.setattr(sa, "KEY_BLOCK", 16)
    layer = SoftmaxAttention(CONFIG, 3, rngs=nnx.Rngs(0))
    l = 128
    x = jax.random.normal(jax.random.PRNGKey(3), (1, l, CONFIG.hidden_size))
    w = jax.random.normal(jax.random.PRNGKey(4), (1, l, CONFIG.hidden_size))
    cos, sin = rope_tables(jnp.arange(l)[None], CONFIG.rope_dim, CONFIG.rope_theta)

    def loss(x):
        return jnp.sum(layer(x, cos_BxLxR=cos, sin_BxLxR=sin)[0] * w)

    expected = jax.jit(jax.grad(loss))(x)
    with jax.set_mesh(make_mesh({"data": 8})):
        assert _manual(loss, x)
        got = jax.jit(jax.grad(loss))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), **TOL)
