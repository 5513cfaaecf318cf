"""Pallas lightning-attention kernels (interpret mode on CPU) against the pure-JAX references.

Covers: forward over ragged/exact sequence lengths and block sizes, fp32/bf16, batch > 1, 1–8 heads, head dims
64/128, slopes 1e-6 … 0.92, zero and non-zero initial states; both GPU forward algorithms ("chunk_parallel", the
default, with its state-chunk / tile variants, and "sequential") and sequence segmentation; gradients of q, k, v and
the initial state through a loss on both outputs (slope: zero cotangent by design); decode == recurrence step;
prefill → decode → decode == one long prefill; both kernel layouts ("gpu": fori_loop, generic interpreter;
"tpu": sequential grid axis under `pltpu.InterpretParams` with race detection); and that the kernels lower for
CUDA (Triton) and TPU (Mosaic) without a device. Worst errors are printed at the end of the module (`pytest -s`).
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from m1jax.pallas_kernels.lightning import api, reference
from m1jax.pallas_kernels.lightning.decode import lightning_decode_pallas
from m1jax.pallas_kernels.lightning.prefill import lightning_attention_pallas
from m1jax.pallas_kernels.lightning.tiling import Tiling, choose_tiling, dot

# Slopes of M1's first/last heads and layers (0.917 … 0.0039, × 0.0127 for the last layer) and ~0.
SLOPES = (0.917, 0.0039, 1e-6, 0.3, 0.05, 0.6, 0.011, 0.125)
TPU_INTERPRET = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2, random_seed=0)
TPU_INTERPRET_FAST = pltpu.InterpretParams()  # race detection costs ~4 s per kernel call: forward/decode only
FP32_TOL = 2e-5   # max |err| / max |ref|
BF16_TOL = 2e-2
WORST: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_worst_errors():
    yield
    print("\nworst errors (max|err| / max|ref|):")
    for name, err in sorted(WORST.items()):
        print(f"  {name:28s} {err:.2e}")


def _rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _check(name: str, x, ref, dtype):
    err = _rel_err(x, ref)
    key = f"{name} {jnp.dtype(dtype).name}"
    WORST[key] = max(WORST.get(key, 0.0), err)
    assert np.all(np.isfinite(np.asarray(x, np.float32))), name
    assert err < (FP32_TOL if dtype == jnp.float32 else BF16_TOL), f"{name}: rel err {err:.3e}"


def _inputs(seed: int, b: int, t: int, h: int, d: int, dtype, *, initial_state: bool, dv: int | None = None):
    dv = d if dv is None else dv
    kq, kk, kv, ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    scale = d ** -0.5
    q = (jax.random.normal(kq, (b, t, h, d)) * scale).astype(dtype)
    k = (jax.random.normal(kk, (b, t, h, d)) * scale).astype(dtype)
    v = jax.random.normal(kv, (b, t, h, dv)).astype(dtype)
    slope = jnp.array([SLOPES[i % len(SLOPES)] for i in range(h)], jnp.float32)
    s0 = jax.random.normal(ks, (b, h, d, dv), jnp.float32) if initial_state else None
    return q, k, v, slope, s0


def _tiling(t, d, dv, *, block_size, b=1, h=1, interpret=True, **overrides) -> Tiling:
    return choose_tiling(t, d, dv, batch=b, heads=h, block_size=block_size, interpret=interpret, **overrides)


@functools.partial(jax.jit, static_argnames=("tiling",))
def _pallas(q, k, v, slope, s0, tiling):
    return lightning_attention_pallas(q, k, v, slope, s0, tiling=tiling)


@jax.jit
def _naive(q, k, v, slope, s0):
    return reference.lightning_attention_naive(q, k, v, slope, s0)


def _loss(fn, q, k, v, slope, s0):
    """A loss on BOTH outputs with fixed random weights, so every cotangent entry is exercised; aux = outputs."""
    out, final = fn(q, k, v, slope, s0)
    w_out = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape) * 0.37)
    w_fin = jnp.sin(jnp.arange(final.size, dtype=jnp.float32).reshape(final.shape) * 0.11) * 0.1
    return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(final * w_fin), (out, final)


def _outputs_and_grads(fn, q, k, v, slope, s0):
    (_, outputs), grads = jax.value_and_grad(functools.partial(_loss, fn), argnums=(0, 1, 2, 3, 4), has_aux=True)(
        q, k, v, slope, s0)
    return outputs, grads


@functools.partial(jax.jit, static_argnames=("tiling",))
def _pallas_grads(q, k, v, slope, s0, tiling):
    return _outputs_and_grads(functools.partial(lightning_attention_pallas, tiling=tiling), q, k, v, slope, s0)


@jax.jit
def _naive_grads(q, k, v, slope, s0):
    return _outputs_and_grads(reference.lightning_attention_naive, q, k, v, slope, s0)


def _check_outputs(out, final, q, k, v, slope, s0, tag, ref_outputs=None):
    chex.assert_shape(out, q.shape[:3] + v.shape[-1:])
    chex.assert_type(out, q.dtype)
    chex.assert_shape(final, (q.shape[0], q.shape[2], q.shape[3], v.shape[3]))
    chex.assert_type(final, jnp.float32)
    if ref_outputs is None:
        ref_outputs = _naive(*(x.astype(jnp.float32) for x in (q, k, v)), slope, s0)
    _check(f"out{tag}", out, ref_outputs[0], q.dtype)
    _check(f"final_state{tag}", final, ref_outputs[1], q.dtype)


def _compare_forward(q, k, v, slope, s0, tiling, tag=""):
    _check_outputs(*_pallas(q, k, v, slope, s0, tiling), q, k, v, slope, s0, tag)


def _compare_grads(q, k, v, slope, s0, tiling, tag=""):
    """Outputs and gradients (q, k, v, slope, initial state) of the Pallas path vs `jax.grad` of the reference."""
    (out, final), grads = _pallas_grads(q, k, v, slope, s0, tiling)
    ref_outputs, ref_grads = _naive_grads(*(x.astype(jnp.float32) for x in (q, k, v)), slope, s0)
    _check_outputs(out, final, q, k, v, slope, s0, tag, ref_outputs)
    for name, g, rg, x in zip(("dq", "dk", "dv", "dslope", "ds0"), grads, ref_grads, (q, k, v, slope, s0)):
        chex.assert_shape(g, x.shape)
        chex.assert_type(g, x.dtype)
        if name == "dslope":  # the decay is a constant of the model: zero cotangent by design
            np.testing.assert_array_equal(g, 0.0)
        else:
            _check(f"{name}{tag}", g, rg, q.dtype)


# ---------------------------------------------------------------------------------------------------- forward

@pytest.mark.parametrize("b,t,h,d,block_size,initial_state", [
    (2, 7, 2, 64, 16, True),
    (1, 255, 4, 128, 64, False),
    (1, 256, 2, 64, 256, True),
    (1, 1000, 8, 64, 64, True),
])
def test_forward_fp32(b, t, h, d, block_size, initial_state):
    q, k, v, slope, s0 = _inputs(t, b, t, h, d, jnp.float32, initial_state=initial_state)
    _compare_forward(q, k, v, slope, s0, _tiling(t, d, d, block_size=block_size, b=b, h=h))


@pytest.mark.parametrize("b,t,h,d,block_size", [(2, 257, 2, 128, 64)])
def test_forward_bf16(b, t, h, d, block_size):
    q, k, v, slope, s0 = _inputs(1, b, t, h, d, jnp.bfloat16, initial_state=True)
    _compare_forward(q, k, v, slope, s0, _tiling(t, d, d, block_size=block_size, b=b, h=h))


def test_forward_segments_and_value_dim():
    """Sequence split into 4 segments (ragged last one), value dim ≠ head dim, two value tiles."""
    b, t, h, d, dv = 2, 1000, 2, 64, 128
    q, k, v, slope, s0 = _inputs(3, b, t, h, d, jnp.float32, initial_state=True, dv=dv)
    tiling = _tiling(t, d, dv, block_size=32, num_segments=4, algorithm="sequential")
    _compare_forward(q, k, v, slope, s0, tiling, tag=" segmented")


def test_forward_tpu_layout():
    b, t, h, d = 1, 257, 2, 128
    q, k, v, slope, s0 = _inputs(4, b, t, h, d, jnp.float32, initial_state=True)
    tiling = _tiling(t, d, d, block_size=128, interpret=TPU_INTERPRET)
    assert tiling.target == "tpu" and tiling.block_t == 128
    _compare_forward(q, k, v, slope, s0, tiling, tag=" tpu")


# ---------------------------------------------------------------------------------------------------- chunk_parallel

def _numpy_reference(q, k, v, slope, s0):
    """float64 quadratic form of the recurrence (no compile): (out, final state)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    slope = np.asarray(slope, np.float64)
    b, t, h, d = q.shape
    s0 = np.zeros((b, h, d, v.shape[-1])) if s0 is None else np.asarray(s0, np.float64)
    idx = np.arange(t, dtype=np.float64)
    diff = idx[:, None] - idx[None, :]
    decay_HxTxT = np.where(diff >= 0, np.exp(-slope[:, None, None] * np.maximum(diff, 0.0)), 0.0)
    out = np.einsum("bhtj,bjhe->bthe", np.einsum("bthd,bjhd->bhtj", q, k) * decay_HxTxT, v)
    out += np.einsum("bthd,bhde->bthe", q * np.exp(-slope[None, :] * (idx[:, None] + 1.0))[None, ..., None], s0)
    k_decay_TxH = np.exp(-slope[None, :] * (t - 1.0 - idx[:, None]))
    final = np.exp(-slope * t)[None, :, None, None] * s0 + np.einsum("bjhd,bjhe->bhde",
                                                                     k * k_decay_TxH[None, ..., None], v)
    return out, final


def _compare_chunk_forward(q, k, v, slope, s0, tiling, tag):
    assert tiling.algorithm == "chunk_parallel"
    ref = _numpy_reference(q, k, v, slope, s0)
    _check_outputs(*_pallas(q, k, v, slope, s0, tiling), q, k, v, slope, s0, tag, ref)


CHUNK_CASES = [(1, jnp.bfloat16, True), (7, jnp.float32, True), (255, jnp.bfloat16, False),
               (256, jnp.float32, True), (257, jnp.bfloat16, True), (1000, jnp.float32, True)]


@pytest.mark.parametrize("t,dtype,initial_state", CHUNK_CASES)
def test_chunk_parallel_forward(t, dtype, initial_state):
    """Default GPU tiling (C = 64 or shorter, states every 128 tokens): every length, fp32 and bf16."""
    b, h, d = 2, 2, 64
    q, k, v, slope, s0 = _inputs(20 + t, b, t, h, d, dtype, initial_state=initial_state)
    tiling = _tiling(t, d, d, block_size=256, b=b, h=h)
    _compare_chunk_forward(q, k, v, slope, s0, tiling, " chunk")


@pytest.mark.parametrize("t,dv,overrides", [
    # fla's layout (a stored state per C-token chunk), K tiles of 32 and V tiles of 16 in the state pass,
    # 4 chunks per output program (a loop); T = 1000 → 16 chunks
    (1000, 64, dict(state_chunk=64, state_block_k=32, state_block_v=16, chunk_block_v=32, chunk_group=4)),
    # 4 sub-chunks of 32 per chunk, 128-token state steps, value dim ≠ head dim (two V tiles); 3 chunks, so
    # chunk_group 4 falls back to 1
    (300, 128, dict(block_t=32, state_chunk=128, state_block_t=128, chunk_block_v=64, chunk_group=4)),
])
def test_chunk_parallel_tilings(t, dv, overrides):
    b, h, d = 1, 3, 64
    q, k, v, slope, s0 = _inputs(30 + t, b, t, h, d, jnp.float32, initial_state=True, dv=dv)
    tiling = _tiling(t, d, dv, block_size=256, b=b, h=h, **overrides)
    assert all(getattr(tiling, key) == value for key, value in overrides.items())
    _compare_chunk_forward(q, k, v, slope, s0, tiling, " chunk tilings")


@pytest.mark.slow
@pytest.mark.parametrize("t", [1, 7, 255, 256, 257, 1000])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("initial_state", [False, True])
def test_chunk_parallel_forward_sweep(t, dtype, initial_state):
    b, h, d = 2, 4, 128
    q, k, v, slope, s0 = _inputs(40 + t, b, t, h, d, dtype, initial_state=initial_state)
    _compare_chunk_forward(q, k, v, slope, s0, _tiling(t, d, d, block_size=256, b=b, h=h), " chunk sweep")


# ---------------------------------------------------------------------------------------------------- backward

@pytest.mark.parametrize("b,t,h,d,block_size,dtype,segments,algorithm", [
    (1, 1, 1, 64, 256, jnp.float32, 1, "chunk_parallel"),
    (2, 257, 3, 64, 32, jnp.float32, 1, "chunk_parallel"),
    (1, 1000, 2, 128, 32, jnp.float32, 4, "sequential"),
    (2, 255, 2, 64, 32, jnp.bfloat16, 2, "chunk_parallel"),
])
def test_gradients(b, t, h, d, block_size, dtype, segments, algorithm):
    """Through the custom_vjp: the forward (and the backward's dq) run `algorithm`, dk/dv the reverse scan."""
    q, k, v, slope, s0 = _inputs(10 + t, b, t, h, d, dtype, initial_state=True)
    tiling = _tiling(t, d, d, block_size=block_size, num_segments=segments, algorithm=algorithm)
    _compare_grads(q, k, v, slope, s0, tiling)


def test_gradients_tpu_layout():
    b, t, h, d = 1, 200, 1, 128
    q, k, v, slope, s0 = _inputs(5, b, t, h, d, jnp.float32, initial_state=True)
    _compare_grads(q, k, v, slope, s0, _tiling(t, d, d, block_size=128, interpret=TPU_INTERPRET_FAST), tag=" tpu")


def test_gradient_without_initial_state_through_api():
    b, t, h, d = 1, 40, 2, 64
    q, k, v, slope, _ = _inputs(6, b, t, h, d, jnp.float32, initial_state=False)

    def loss(impl, q, k, v):
        out, final = api.lightning_attention(q, k, v, slope, block_size=16, impl=impl)
        return jnp.sum(out * out) + jnp.sum(final)

    got = jax.jit(jax.grad(functools.partial(loss, "pallas"), argnums=(0, 1, 2)))(q, k, v)  # interpret=None
    want = jax.jit(jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2)))(q, k, v)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        _check(f"{name} api", g, w, jnp.float32)


# ---------------------------------------------------------------------------------------------------- decode

@pytest.mark.parametrize("dtype,interpret", [(jnp.float32, True), (jnp.bfloat16, True),
                                             (jnp.float32, TPU_INTERPRET)])
def test_decode_matches_reference(dtype, interpret):
    b, h, d = 3, 4, 128
    q, k, v, slope, s0 = _inputs(7, b, 1, h, d, dtype, initial_state=True)
    q, k, v = q[:, 0], k[:, 0], v[:, 0]
    out, state = jax.jit(functools.partial(lightning_decode_pallas, interpret=interpret))(q, k, v, slope, s0)
    chex.assert_shape(out, (b, h, d))
    chex.assert_type(out, dtype)
    chex.assert_type(state, jnp.float32)
    ref_out, ref_state = reference.lightning_decode_reference(q, k, v, slope, s0)
    _check("decode out", out, ref_out, dtype)
    _check("decode state", state, ref_state, jnp.float32)


def test_decode_is_one_recurrence_step_and_updates_in_place():
    b, h, d = 2, 2, 64
    q, k, v, slope, s0 = _inputs(8, b, 1, h, d, jnp.float32, initial_state=True)
    ref_out, ref_state = reference.lightning_attention_recurrent(q, k, v, slope, s0)
    step = jax.jit(functools.partial(api.lightning_decode, impl="pallas"), donate_argnums=(4,))
    out, state = step(q[:, 0], k[:, 0], v[:, 0], slope, s0 + 0.0)
    _check("decode vs recurrence", out, ref_out[:, 0], jnp.float32)
    _check("decode vs recurrence", state, ref_state, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_prefill_then_decode_equals_long_prefill(dtype):
    b, t, h, d = 2, 131, 3, 64
    q, k, v, slope, s0 = _inputs(9, b, t + 2, h, d, dtype, initial_state=True)
    prefill = jax.jit(functools.partial(api.lightning_attention, block_size=64, impl="pallas"))
    decode = jax.jit(functools.partial(api.lightning_decode, impl="pallas"))
    out, state = prefill(q[:, :t], k[:, :t], v[:, :t], slope, s0)
    outs = [out]
    for i in (t, t + 1):
        o, state = decode(q[:, i], k[:, i], v[:, i], slope, state)
        outs.append(o[:, None])
    long_out, long_state = prefill(q, k, v, slope, s0)
    _check("prefill+decode out", jnp.concatenate(outs, axis=1), long_out, dtype)
    _check("prefill+decode state", state, long_state, dtype)  # bf16 prefill rounds K·decay for its GEMM


# ---------------------------------------------------------------------------------------------------- dispatch

@pytest.mark.parametrize("dtype,precision", [(jnp.bfloat16, jax.lax.Precision.DEFAULT),
                                             (jnp.float32, jax.lax.Precision.HIGHEST)])
def test_kernel_dot_precision_follows_operands(dtype, precision):
    """The kernels' dot: bf16 operands at an explicit DEFAULT (Mosaic rejects HIGHEST on bf16, and the suite's
    global "highest" must not reach it), fp32 at HIGHEST; always fp32 results (tests/test_aot.py compiles them)."""
    a = jnp.ones((8, 16), dtype)
    (eqn,) = jax.make_jaxpr(dot)(a, a.T).eqns
    assert eqn.params["precision"] == (precision, precision)
    assert eqn.outvars[0].aval.dtype == jnp.float32


def test_api_dispatch_and_tiling_rules(monkeypatch):
    assert api.resolve_impl("auto") == "xla"  # CPU has no compiled Pallas lowering
    assert api.resolve_impl("pallas") == "pallas"
    with pytest.raises(ValueError):
        api.resolve_impl("cuda")
    monkeypatch.setenv(api.IMPL_ENV, "pallas")
    assert api.resolve_impl("auto") == "pallas" and api.resolve_impl("xla") == "xla"
    monkeypatch.delenv(api.IMPL_ENV)
    gpu = choose_tiling(1000, 128, 128, batch=1, heads=64, block_size=256, interpret=True)
    assert (gpu.target, gpu.block_t, gpu.block_v, gpu.num_segments) == ("gpu", 64, 64, 1)
    assert (gpu.algorithm, gpu.state_chunk, gpu.state_block_t) == ("chunk_parallel", 128, 64)
    short = choose_tiling(7, 64, 64, block_size=256, interpret=True)
    assert (short.block_t, short.state_chunk, short.state_block_t) == (16, 16, 16)
    assert choose_tiling(1000, 64, 64, block_size=256, interpret=True, block_t=128).state_chunk == 128
    assert choose_tiling(1000, 64, 64, interpret=True, algorithm="sequential").algorithm == "sequential"
    for bad in (dict(state_chunk=96), dict(state_chunk=64, state_block_t=128), dict(state_block_k=8),
                dict(chunk_group=3)):
        with pytest.raises(NotImplementedError):
            choose_tiling(1000, 64, 64, interpret=True, **bad)
    with pytest.raises(ValueError):
        choose_tiling(1000, 64, 64, interpret=True, algorithm="parallel")
    with pytest.raises(NotImplementedError):
        choose_tiling(1000, 128, 128, interpret=TPU_INTERPRET, algorithm="chunk_parallel")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # compiled-GPU choices, nothing is run
    assert choose_tiling(1000, 128, 128, batch=1, heads=64).num_segments == 2  # ≥ 8 blocks per segment
    assert choose_tiling(65536, 128, 128, batch=1, heads=64).num_segments == 8  # 64·2·8 programs
    assert choose_tiling(65536, 128, 128, batch=8, heads=64).num_segments == 1
    assert not choose_tiling(65536, 128, 128).interpret
    monkeypatch.undo()
    tpu = choose_tiling(1000, 128, 128, block_size=256, interpret=TPU_INTERPRET)
    assert (tpu.target, tpu.block_t, tpu.block_v) == ("tpu", 256, 128)
    with pytest.raises(NotImplementedError):
        choose_tiling(100, 96, 96, interpret=True)  # Triton needs power-of-two head dims
    monkeypatch.setattr(api, "_pallas_backend_supported", lambda: True)  # pretend to be on a GPU
    q, k, v, slope, _ = _inputs(0, 1, 20, 2, 96, jnp.float32, initial_state=False)
    out, _ = jax.jit(functools.partial(api.lightning_attention, impl="auto"))(q, k, v, slope)  # XLA: dim 96
    _check("auto fallback", out, _naive(q, k, v, slope, None)[0], jnp.float32)
    with pytest.raises(NotImplementedError):
        api.lightning_attention(q, k, v, slope, impl="pallas")


@pytest.mark.parametrize("platform,tiling", [
    ("cuda", Tiling("gpu", 64, 64, 32, num_segments=2)),
    ("cuda", Tiling("gpu", 64, 64, 32, num_segments=2, algorithm="chunk_parallel")),
    ("tpu", Tiling("tpu", 256, 128, 128)),
])
def test_kernels_lower_for_device(platform, tiling):
    """The kernels lower to Triton / Mosaic (no device needed; catches unsupported ops and block shapes)."""
    b, t, h, d = 1, 1000, 2, 128
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
    slope = jax.ShapeDtypeStruct((h,), jnp.float32)
    s0 = jax.ShapeDtypeStruct((b, h, d, d), jnp.float32)
    grads = functools.partial(_pallas_grads, tiling=tiling)
    decode = functools.partial(lightning_decode_pallas, tiling=tiling)
    x = jax.ShapeDtypeStruct((b, h, d), jnp.bfloat16)
    todo = [(grads, (q, q, q, slope, s0)), (decode, (x, x, x, slope, s0))]
    if tiling.algorithm == "chunk_parallel":  # also fp32 operands (a smaller output-pass value tile)
        q32 = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
        todo.append((functools.partial(lightning_attention_pallas, tiling=tiling), (q32, q32, q32, slope, s0)))
    for fn, args in todo:
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
        assert ("triton" if platform == "cuda" else "tpu_custom_call") in text
        if tiling.algorithm == "chunk_parallel" and fn is not decode:
            assert "lightning_forward_states" in text or "lightning_backward_dq_states" in text


# ---------------------------------------------------------------------------------------------------- slow sweep

@pytest.mark.slow
@pytest.mark.parametrize("t", [1, 7, 255, 256, 257, 1000])
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_forward_sweep(t, block_size):
    q, k, v, slope, s0 = _inputs(t, 2, t, 8, 128, jnp.float32, initial_state=True)
    _compare_forward(q, k, v, slope, s0, _tiling(t, 128, 128, block_size=block_size, b=2, h=8))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("interpret", [True, TPU_INTERPRET_FAST])
def test_gradients_sweep(dtype, interpret):
    b, t, h, d = 2, 1000, 8, 128
    q, k, v, slope, s0 = _inputs(11, b, t, h, d, dtype, initial_state=True)
    tiling = _tiling(t, d, d, block_size=128 if interpret is not True else 64, interpret=interpret)
    _compare_grads(q, k, v, slope, s0, tiling, tag=" sweep")
    if interpret is True:
        _compare_grads(q, k, v, slope, s0, dataclasses.replace(tiling, num_segments=4), tag=" sweep")
