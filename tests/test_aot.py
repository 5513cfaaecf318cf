"""Deviceless ahead-of-time compilation: the lightning kernels and a bf16 model compile for TPU and GPU.

No accelerator is used. TPU: libtpu's compiler over devices of a v5p topology description (`pip install -e
'.[tpu]'`; conftest sets `m1jax.topology.deviceless_env()`). GPU: XLA:GPU over compile-only H100 devices from a
target description (`pip install -e '.[gpu-aot]'`, the jax CUDA plugin). Each test is skipped with the reason
when its compiler is not importable. `jax.default_backend()` is patched to report the target ("tpu" / "gpu"),
so every backend-chosen path (lightning "auto" → Pallas, compiled not interpreted, Mosaic or Triton layout;
MoE "auto" → ragged_dot / gather; no CPU fusion barriers) takes the branch it takes on a real host, and the
compiled HLO must hold the Pallas kernels as Mosaic (`tpu_custom_call`) or Triton custom calls: a kernel the
backend's compiler rejects (e.g. a HIGHEST-precision bf16 dot under Mosaic) fails here.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import NamedSharding, PartitionSpec
from m1jax.pallas_kernels.lightning import api

from m1jax import topology
from m1jax.cache import abstract_cache
from m1jax.config import LIGHTNING, SOFTMAX, ModelConfig
from m1jax.loading import abstract_sharded_model
from m1jax.sharding import make_mesh, named_sharding

KERNEL_CALL = {"tpu": 'custom_call_target="tpu_custom_call"', "gpu": 'custom_call_target="__gpu$xla.gpu.triton"'}
SKIP = {"tpu": pytest.mark.skipif(not topology.libtpu_available(), reason="libtpu is not importable (.[tpu])"),
        "gpu": pytest.mark.skipif(not topology.cuda_plugin_available(),
                                  reason="the jax CUDA plugin is not importable (.[gpu-aot])")}


def _on(platform: str, *values, slow: bool = False):
    """A parameter set for `platform` with its marker (`tpu` / `gpu`) and skip condition."""
    marks = [getattr(pytest.mark, platform), SKIP[platform]] + [pytest.mark.slow] * slow
    return pytest.param(platform, *values, marks=marks, id="-".join([platform, *map(str, values)]))


FORWARD = {"lightning_forward"}
BACKWARD = {"lightning_backward_dq", "lightning_backward_dv", "lightning_backward_dk"}
DECODE = {"lightning_decode"}


@pytest.fixture(scope="module", autouse=True)
def _no_persistent_cache():
    """Keep deviceless executables out of the persistent compilation cache (conftest): they cannot be loaded
    back without a client, and writing them costs time."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


def _devices(platform: str, count: int):
    """`count` compile-only devices: chips of a v5p-8 slice (4 chips) or of one H100 host."""
    if platform == "tpu":
        return topology.topology_devices("v5p-8")[:count]
    return topology.gpu_devices("h100", count)


@pytest.fixture
def target(request, monkeypatch):
    """The platform under test, with `jax.default_backend()` reporting it as a real host of it would."""
    platform = request.param
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    return platform


def _kernels(compiled, platform: str) -> set[str]:
    """Names of the lightning Pallas kernels that the compiled program calls as Mosaic / Triton custom calls."""
    lines = [line for line in compiled.as_text().splitlines() if KERNEL_CALL[platform] in line]
    return {name for line in lines for name in FORWARD | BACKWARD | DECODE if re.search(rf"\b{name}\b", line)}


# fp32 Triton kernels take ~85 s per kernel to compile here (HIGHEST-precision dots): slow.
@pytest.mark.parametrize("target,dtype", [_on("tpu", "bfloat16"), _on("tpu", "float32"), _on("gpu", "bfloat16"),
                                          _on("gpu", "float32", slow=True)], indirect=["target"])
def test_lightning_kernels_compile(target, dtype):
    """Forward, forward+backward and decode through `impl="auto"` compile on one chip, as Pallas kernels."""
    dtype = jnp.dtype(dtype)
    (device,) = _devices(target, 1)
    one = NamedSharding(jax.sharding.Mesh([device], ("x",)), PartitionSpec())
    b, t, h, d = 2, 300, 2, 128  # a ragged length: the last block is padded

    def spec(shape, dt=dtype):
        return jax.ShapeDtypeStruct(shape, dt, sharding=one)

    x, x1, slope, state = spec((b, t, h, d)), spec((b, h, d)), spec((h,), jnp.float32), spec((b, h, d, d), jnp.float32)

    def forward(q, k, v, slope, s0):
        return api.lightning_attention(q, k, v, slope, s0)

    def grads(q, k, v, slope, s0):
        def loss(q, k, v, s0):
            out, final = forward(q, k, v, slope, s0)
            return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(final ** 2)
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, s0)

    for fn, args, expected in [(forward, (x, x, x, slope, state), FORWARD),
                               (grads, (x, x, x, slope, state), FORWARD | BACKWARD),
                               (api.lightning_decode, (x1, x1, x1, slope, state), DECODE)]:
        compiled = jax.jit(fn).lower(*args).compile()
        assert _kernels(compiled, target) == expected, fn.__name__


TINY_REAL = ModelConfig(  # M1's per-head shapes (head dim 128, top-2 MoE), both layer kinds, tiny widths
    vocab_size=1024, hidden_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    head_dim=128, intermediate_size=256, num_local_experts=4, num_experts_per_tok=2,
    layer_types=(LIGHTNING, SOFTMAX), rotary_dim=64, dtype="bfloat16", param_dtype="bfloat16")
MESHES = {"1chip": {}, "tensor2xexpert2": {"tensor": 2, "expert": 2}}


@pytest.mark.parametrize("target,mesh_name", [_on(p, m) for p in ("tpu", "gpu") for m in MESHES], indirect=["target"])
def test_bf16_model_compiles(target, mesh_name):
    """The bf16 model's prefill (300 tokens) and one decode step compile on one chip and on a 4-chip mesh, with
    the lightning layers as Pallas kernels (per shard under the mesh)."""
    mesh_shape = MESHES[mesh_name]
    mesh = make_mesh(mesh_shape, devices=_devices(target, math.prod(mesh_shape.values())))
    graphdef, params = abstract_sharded_model(TINY_REAL, mesh)
    b, t, max_len = 2, 300, 512
    tokens = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=named_sharding(("batch", None), (b, t), mesh))
    token = jax.ShapeDtypeStruct((b, 1), jnp.int32, sharding=named_sharding(("batch", None), (b, 1), mesh))
    cache = abstract_cache(TINY_REAL, b, max_len, mesh=mesh)

    def prefill(params, tokens):
        return nnx.merge(graphdef, params)(tokens).logits

    def decode_step(params, cache, token):
        out = nnx.merge(graphdef, params)(token, cache=cache, logits="last")
        return out.logits, out.cache

    with jax.set_mesh(mesh):
        compiled_prefill = jax.jit(prefill).lower(params, tokens).compile()
        compiled_decode = jax.jit(decode_step).lower(params, cache, token).compile()
    assert _kernels(compiled_prefill, target) == FORWARD
    assert _kernels(compiled_decode, target) == DECODE
    assert compiled_prefill.memory_analysis().argument_size_in_bytes > 0
