"""int8 experts (`quantize="int8-experts"`): quantization error bounds; every expert implementation with int8
weights equals the same implementation on the dequantized weights; whole-model logits vs bf16; loading,
`m1jax convert --quantize` → load → export; memory; generation; the trainer refuses int8."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from m1jax.convert.hf_checkpoint import HFCheckpoint
from m1jax.convert.hf_to_m1jax import convert_checkpoint
from m1jax.convert.m1jax_checkpoint import MARKER, M1jaxCheckpoint
from m1jax.convert.m1jax_to_hf import export_checkpoint, export_model
from synthetic_checkpoint import write_small

import m1jax.cli
from m1jax.config import ConfigError, ModelConfig
from m1jax.generation import generate
from m1jax.loading import build_from_views, from_pretrained
from m1jax.model import MiniMaxM1
from m1jax.modules import moe
from m1jax.quantize import (
    DequantizedView,
    QuantizedView,
    dequantize_int8,
    dequantize_views,
    quantize_int8,
    quantize_views,
)

INT8 = "int8-experts"


def flat(model) -> dict:
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def quantized_copy(model: MiniMaxM1, **runtime) -> MiniMaxM1:
    """The same model with int8 experts quantized from its weights (through the loading path's views)."""
    config = model.config.replace(quantize=INT8, **runtime)
    return build_from_views(config, quantize_views(flat(model)))


def dequantized_copy(model_q: MiniMaxM1, dtype="float32") -> MiniMaxM1:
    """The float model whose expert weights are exactly q·s of `model_q`."""
    config = model_q.config.replace(quantize=None, dtype=dtype, param_dtype=dtype)
    views = {p: np.asarray(v) for p, v in dequantize_views(flat(model_q)).items()}
    return build_from_views(config, views)


# --------------------------------------------------------------------------- quantize / dequantize
@pytest.mark.parametrize("xp", [np, jnp])
def test_round_trip_error_is_at_most_half_a_step(xp):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 40, 24)).astype(np.float32) * np.linspace(0.01, 3.0, 24, dtype=np.float32)
    w[1, :, 5] = 0.0  # an all-zero output channel
    q, s = quantize_int8(xp.asarray(w))
    q, s = np.asarray(q), np.asarray(s)
    assert q.dtype == np.int8 and s.dtype == np.float32 and q.shape == w.shape and s.shape == (3, 24)
    assert np.abs(q).max() == 127 and q.min() >= -127
    np.testing.assert_array_equal(np.abs(q).max(axis=1)[s != 1.0], 127)  # every channel's max maps to ±127
    assert s[1, 5] == 1.0 and not q[1, :, 5].any()
    err = np.abs(dequantize_int8(q, s) - w)
    assert np.all(err <= s[:, None, :] * (0.5 + 1e-6))
    assert (err / s[:, None, :]).max() > 0.45  # the bound is tight
    np.testing.assert_allclose(s[s != 1.0], (np.abs(w).max(axis=1) / 127)[s != 1.0], rtol=1e-7)


def test_numpy_and_jax_quantize_agree_and_bf16_input_works():
    w = (np.random.default_rng(1).standard_normal((2, 16, 8)) * 0.02).astype(ml_dtypes.bfloat16)
    qn, sn = quantize_int8(w)
    qj, sj = quantize_int8(jnp.asarray(w))
    np.testing.assert_array_equal(qn, np.asarray(qj))
    np.testing.assert_array_equal(sn, np.asarray(sj))


def test_lazy_views_quantize_any_region_like_the_whole():
    w = np.random.default_rng(2).standard_normal((4, 12, 10)).astype(np.float32)
    q, s = quantize_int8(w)
    qv, sv = QuantizedView(w, "q"), QuantizedView(w, "scale")
    assert qv.shape == (4, 12, 10) and sv.shape == (4, 10) and qv.dtype == np.int8
    for index in [(slice(1, 3), slice(None), slice(5, 10)), (2,), (slice(None), slice(4, 8)), (Ellipsis, 3)]:
        np.testing.assert_array_equal(qv[index], q[index])
    for index in [(slice(1, 3), slice(5, 10)), (3,), (slice(None),)]:
        np.testing.assert_array_equal(sv[index], s[index])
    w4 = np.random.default_rng(3).standard_normal((2, 3, 8, 5)).astype(np.float32)  # a scanned model's [G, E, K, N]
    q4, s4 = quantize_int8(w4)
    for index in [(1, slice(1, 3), slice(2, 6)), (0, 2), (Ellipsis, 4)]:
        np.testing.assert_array_equal(QuantizedView(w4, "q")[index], q4[index])
    np.testing.assert_array_equal(QuantizedView(w4, "scale")[1, 1:3, 2:4], s4[1, 1:3, 2:4])
    np.testing.assert_array_equal(DequantizedView(q4, s4)[1, 2, :, 1:3], dequantize_int8(q4, s4)[1, 2, :, 1:3])
    dv = DequantizedView(q, s)
    np.testing.assert_array_equal(dv[1, :, 2:4], dequantize_int8(q, s)[1, :, 2:4])
    np.testing.assert_array_equal(np.asarray(dv), dequantize_int8(q, s))


def test_config_validates_quantize():
    c = ModelConfig.from_preset("tiny", quantize=INT8)
    assert c.quantize == INT8
    with pytest.raises(ConfigError, match="'quantize'"):
        c.replace(quantize="int4")


# --------------------------------------------------------------------------- expert implementations
def expert_weights(e=6, d=32, f=48, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (0.3 * jax.random.normal(ks[0], (d, e)), 0.2 * jax.random.normal(ks[1], (e, d, f)),
            0.2 * jax.random.normal(ks[2], (e, d, f)), 0.2 * jax.random.normal(ks[3], (e, f, d)))


@pytest.mark.parametrize("impl", ["dense", "gather", "switch", "switch-unstacked", "ragged", "tiled"])
@pytest.mark.parametrize("tokens", [pytest.param(3, marks=pytest.mark.slow), 70])
def test_int8_impl_equals_the_dequantized_weights(impl, tokens):
    """(x·q)·s per output channel == x·(q·s): each implementation on int8 weights + scales equals the dense
    reference on the dequantized fp32 weights (fp32, tight)."""
    gate, *ws = expert_weights()
    x = jax.random.normal(jax.random.PRNGKey(tokens), (tokens, 32))
    _, wts, idx = moe.route(x, gate, 2)
    qs = [quantize_int8(w) for w in ws]
    q, scales = [a for a, _ in qs], tuple(s for _, s in qs)
    ref = moe.experts_dense(x, *(dequantize_int8(a, s) for a, s in qs), wts, idx)
    if impl == "switch-unstacked":
        impl = "switch"
        q = [tuple(a[e] for e in range(a.shape[0])) for a in q]
        scales = tuple(tuple(s[e] for e in range(s.shape[0])) for s in scales)
    got = jax.jit(lambda x, q, s: moe.EXPERT_IMPLS[impl](x, *q, wts, idx, scales=s))(x, q, scales)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6)
    assert rel_err(ref, moe.experts_dense(x, *ws, wts, idx)) > 1e-4  # int8 did change the weights


# --------------------------------------------------------------------------- the whole model
def tiny_config(**runtime) -> ModelConfig:
    """Two layers (lightning, softmax) of the tiny preset, weights N(0, 0.1²): large enough that the experts
    matter, small enough that the random model is not chaotic (at 0.2, fp32 vs int8 differ by 13%)."""
    return ModelConfig.from_preset("tiny", **runtime).replace(
        num_hidden_layers=2, layer_types=("linear_attention", "full_attention"), initializer_range=0.1)


@pytest.fixture(scope="module")
def tiny_models():
    """A tiny fp32 model and its int8-experts copy (fp32 compute)."""
    fp32 = MiniMaxM1(tiny_config(), rngs=nnx.Rngs(0))
    return fp32, quantized_copy(fp32)


def logits_of(model, tokens, impl=None):
    return np.asarray(nnx.jit(lambda m, t: m(t, moe_impl=impl).logits)(model, tokens))


TOKENS = np.random.default_rng(1).integers(0, 512, (2, 24))


@pytest.fixture(scope="module")
def tiny_logits(tiny_models):
    """Logits of `TOKENS` (MoE impl "auto": tiled here) for fp32, int8 (fp32 compute), the dequantized fp32
    model, bf16 and int8 (bf16 compute), all from the same weights."""
    fp32, int8_f32 = tiny_models
    bf16 = build_from_views(fp32.config.replace(dtype="bfloat16", param_dtype="bfloat16"), flat(fp32))
    models = {"fp32": fp32, "int8_f32": int8_f32, "dequantized": dequantized_copy(int8_f32), "bf16": bf16,
              "int8": quantized_copy(bf16)}
    return {name: logits_of(m, jnp.asarray(TOKENS)) for name, m in models.items()}


def test_int8_model_equals_the_dequantized_model(tiny_logits):
    want = tiny_logits["dequantized"]
    np.testing.assert_allclose(tiny_logits["int8_f32"], want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["switch", "dense", "ragged", "gather"])
def test_int8_model_equals_the_dequantized_model_every_impl(tiny_models, tiny_logits, impl):
    want = tiny_logits["dequantized"]
    got = logits_of(tiny_models[1], jnp.asarray(TOKENS), impl)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_int8_logits_error_vs_bf16_is_bounded(tiny_logits, record_property):
    """int8 experts vs float experts: in fp32 compute the quantization error alone; in bf16 compute below
    the error bf16 itself makes vs fp32."""
    lg = tiny_logits
    e_q = rel_err(lg["int8_f32"], lg["fp32"])
    e_int8, e_bf16 = rel_err(lg["int8"], lg["bf16"]), rel_err(lg["bf16"], lg["fp32"])
    for name, value in (("int8_vs_fp32_fp32_compute", e_q), ("int8_vs_bf16", e_int8), ("bf16_vs_fp32", e_bf16)):
        record_property(name, value)
    assert 1e-4 < e_q < 1e-2, e_q
    assert 0 < e_int8 < e_bf16, (e_int8, e_bf16)


def test_expert_memory_is_half_of_bf16(tiny_models):
    fp32, model_q = tiny_models
    bf16 = build_from_views(fp32.config.replace(param_dtype="bfloat16"), flat(fp32))
    ratio = moe.expert_weight_bytes(nnx.state(model_q)) / moe.expert_weight_bytes(nnx.state(bf16))
    d, f = fp32.config.hidden_size, fp32.config.intermediate_size
    assert ratio == pytest.approx(0.5 + (2 * f + d) * 4 / (3 * d * f * 2), rel=1e-9)  # int8 + fp32 scales
    assert 0.5 < ratio < 0.56


def test_scanned_int8_model_equals_the_dequantized_model():
    config = tiny_config().replace(scan_layers=True, num_hidden_layers=4,
                                   layer_types=("linear_attention", "full_attention") * 2)
    model_q = quantized_copy(MiniMaxM1(config, rngs=nnx.Rngs(1)))  # stacked [G, E, K, N] views quantized
    assert ("stacked_layers", 1, "block_sparse_moe", "w2_scale") in flat(model_q)
    tokens = jnp.asarray(TOKENS[:, :8])
    want = logits_of(dequantized_copy(model_q), tokens)
    np.testing.assert_allclose(logits_of(model_q, tokens), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


@pytest.mark.slow
def test_generation_with_int8_matches_the_dequantized_model(tiny_models):
    _, model_q = tiny_models
    prompts = [[5, 9, 17, 3], [7, 1]]
    kw = dict(max_new_tokens=6, temperature=0.0, repetition_stop=None)
    got = generate(model_q, prompts, **kw)
    want = generate(dequantized_copy(model_q), prompts, **kw)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert all(len(r.tokens) == 6 for r in got)


def test_unstacked_int8_experts_split_weights_and_scales_per_expert(tiny_models):
    params = nnx.state(tiny_models[1])
    unstacked = moe.unstack_experts(params)
    for name in moe.EXPERT_WEIGHTS + moe.EXPERT_SCALES:
        stacked = np.asarray(params["layers"][1]["block_sparse_moe"][name].get_value())
        parts = unstacked["layers"][1]["block_sparse_moe"][name].get_value()
        assert isinstance(parts, tuple) and len(parts) == stacked.shape[0], name
        for e, part in enumerate(parts):
            np.testing.assert_array_equal(np.asarray(part), stacked[e], err_msg=name)


def test_generate_cli_quantizes_the_model(capsys):
    rc = m1jax.cli.main(["generate", "--preset", "tiny", "--quantize", INT8, "--max-new-tokens", "3",
                         "--temperature", "0", "--no-stream", "--prefill-chunk", "16"])
    assert rc == 0, capsys.readouterr().err
    assert "3 generated" in capsys.readouterr().err


# --------------------------------------------------------------------------- load / convert / export
@pytest.fixture(scope="module")
def small_hf(tmp_path_factory):
    return write_small(tmp_path_factory.mktemp("hf") / "hf", tiny_config().to_hf_dict())


@pytest.fixture(scope="module")
def converted_int8(small_hf, tmp_path_factory):
    dst = tmp_path_factory.mktemp("m1jax") / "int8"
    assert m1jax.cli.main(["convert", str(small_hf), str(dst), "--quantize", INT8, "--quiet",
                           "--block-bytes", "20000"]) == 0
    return dst


def test_load_with_quantize_equals_quantizing_the_loaded_model(small_hf):
    model_q = from_pretrained(small_hf, dtype="float32", quantize=INT8)
    assert model_q.config.quantize == INT8
    want = flat(quantized_copy(from_pretrained(small_hf, dtype="float32")))
    got = flat(model_q)
    assert got.keys() == want.keys()
    for path in got:
        np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
    assert got[("layers", 1, "block_sparse_moe", "w2")].dtype == np.int8
    assert got[("layers", 1, "block_sparse_moe", "w2_scale")].shape == (4, 64)


def test_convert_quantize_then_load_and_export(small_hf, converted_int8, tmp_path):
    marker = json.loads((converted_int8 / MARKER).read_text())
    assert marker["quantize"] == INT8 and marker["arguments"]["quantize"] == INT8
    params = marker["parameters"]
    assert params["layers.0.block_sparse_moe.w1.value"]["dtype"] == "I8"
    assert params["layers.0.block_sparse_moe.w1_scale.value"] == {"shape": [4, 96], "dtype": "F32"}
    assert params["layers.0.block_sparse_moe.gate.value"]["dtype"] == "F32"

    loaded = from_pretrained(converted_int8)  # int8, as the marker says, without asking
    assert loaded.config.quantize == INT8 and loaded.config.dtype == "bfloat16"
    direct = flat(from_pretrained(small_hf, quantize=INT8))
    got = flat(loaded)
    for path in direct:
        np.testing.assert_array_equal(got[path], direct[path], err_msg=str(path))

    from m1jax.sharding import make_mesh

    sharded = from_pretrained(converted_int8, mesh=make_mesh({"tensor": 2, "expert": 4}))
    w1 = nnx.state(sharded)["layers"][0]["block_sparse_moe"]["w1"].get_value()
    assert tuple(w1.sharding.spec) == ("expert", None, "tensor")
    for path, value in flat(sharded).items():
        np.testing.assert_array_equal(value, got[path], err_msg=str(path))

    out = export_checkpoint(converted_int8, tmp_path / "hf", dtype="float32", progress=False)
    hf = HFCheckpoint(out)
    q, s = got[("layers", 1, "block_sparse_moe", "w3")], got[("layers", 1, "block_sparse_moe", "w3_scale")]
    np.testing.assert_array_equal(np.asarray(hf.get("model.layers.1.block_sparse_moe.experts.2.w3.weight")),
                                  dequantize_int8(q, s)[2].T)
    src = np.asarray(HFCheckpoint(small_hf).get("model.layers.1.block_sparse_moe.experts.2.w3.weight"), np.float32)
    exported = np.asarray(hf.get("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    assert np.abs(exported - src).max() <= np.abs(src).max() / 127 * 0.51 + 1e-6  # half a step (bf16 source)
    assert M1jaxCheckpoint(converted_int8).quantize == INT8

    again = export_model(loaded, tmp_path / "hf2", dtype="float32", shard_size="10GB")  # the in-memory int8 model
    for name in ("model.layers.1.block_sparse_moe.experts.2.w3.weight", "model.layers.0.self_attn.qkv_proj.weight"):
        np.testing.assert_array_equal(np.asarray(HFCheckpoint(again).get(name)), np.asarray(hf.get(name)), name)


def test_convert_refuses_an_unknown_quantize(small_hf, tmp_path):
    from m1jax.convert.errors import ConvertError

    with pytest.raises(ConvertError, match="--quantize"):
        convert_checkpoint(small_hf, tmp_path / "x", quantize="int4", progress=False)


def test_trainer_refuses_an_int8_checkpoint(converted_int8):
    from m1jax.train.model_setup import build_model
    from m1jax.train.run_config import ModelSpec, RunConfigError

    with pytest.raises(RunConfigError, match="int8-experts.*without --quantize"):
        build_model(ModelSpec(checkpoint=str(converted_int8)), seed=0)


@pytest.mark.parametrize("shape", [{"data": 2, "tensor": 2, "expert": 2},
                                   pytest.param({"tensor": 2, "expert": 4}, marks=pytest.mark.slow)])
def test_int8_forward_on_a_mesh_equals_unsharded(tiny_models, tiny_logits, shape):
    from m1jax.sharding import make_mesh

    mesh = make_mesh(shape)
    sharded = build_from_views(tiny_models[1].config, flat(tiny_models[1]), mesh=mesh)
    scale = nnx.state(sharded)["layers"][0]["block_sparse_moe"]["w2_scale"].get_value()
    assert scale.sharding.spec[0] == "expert"
    with jax.set_mesh(mesh):
        got = logits_of(sharded, jnp.asarray(TOKENS))
    want = tiny_logits["int8_f32"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))
