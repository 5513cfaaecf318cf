"""Public lightning-attention entry points and the one place where an implementation is chosen.

`impl`: "xla" (the pure-JAX blocked path of `reference.py`), "pallas" (the Pallas kernels), "recurrent" (the
token-by-token scan of `reference.py`: slow, the check `m1jax verify` compares the blocked paths with), or "auto"
(Pallas where the backend has a compiled lowering — GPU via Triton, TPU via Mosaic — else XLA; also XLA when
the kernels cannot tile the shapes, e.g. a head dim that is not a power of two on GPU).
The environment variable `M1JAX_LIGHTNING_IMPL` ("xla" / "pallas") overrides what "auto" picks.
`interpret=None` runs Pallas in interpret mode on CPU and compiled elsewhere; `interpret=True` forces the
generic interpreter (GPU layout), a `pltpu.InterpretParams` the TPU interpreter (TPU layout). Block sizes and
layouts are chosen in `tiling.py`.
"""

from __future__ import annotations

import os

import jax
from m1jax.pallas_kernels.lightning import reference

IMPLS = ("auto", "xla", "pallas", "recurrent")
IMPL_ENV = "M1JAX_LIGHTNING_IMPL"
# Measured on an H100 (benchmarks/RESULTS.md): the Pallas decode wins at batch 1 (31.7 vs 39.6 µs), XLA's
# fused update at batch 128 (423 vs 556 µs); "auto" decodes larger batches on GPU with XLA.
GPU_PALLAS_DECODE_MAX_BATCH = 16
# The XLA path computes in blocks of at most this many tokens: the result equals any other blocking up to fp32
# rounding, and smaller blocks cost fewer FLOPs (C·D + D² per token per head): on a 2-core CPU at T = 2048,
# 8 heads x 64, 17 µs/token with C = 64 vs 45 µs/token with C = 256.
XLA_MAX_BLOCK = 64


def _pallas_backend_supported() -> bool:
    return jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")


def resolve_impl(impl: str) -> str:
    """Map "auto" to the implementation used on the current default backend."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        forced = os.environ.get(IMPL_ENV, "").strip().lower()
        if forced:
            if forced not in IMPLS[1:]:
                raise ValueError(f"{IMPL_ENV} must be one of {IMPLS[1:]}, got {forced!r}")
            return forced
        return "pallas" if _pallas_backend_supported() else "xla"
    return impl


def lightning_attention(q, k, v, slope, initial_state=None, *, block_size: int = 256, impl: str = "auto",
                        interpret: bool | None = None):
    """Decayed linear attention S_t = λ S_{t−1} + k_tᵀ v_t, o_t = q_t S_t with λ = exp(−slope) per head.

    q, k, v: `[batch, seq, heads, head_dim]`; slope: `[heads]`; initial_state: `[batch, heads, head_dim, head_dim]`
    fp32 or None (zeros). Returns `(out [batch, seq, heads, head_dim] in q.dtype, final_state fp32)`.
    `block_size` is the model's block (RC: 256); an implementation may compute in smaller blocks, which changes
    the result only by fp32 rounding.
    """
    requested, impl = impl, resolve_impl(impl)
    if impl == "pallas":
        from m1jax.pallas_kernels.lightning import prefill, tiling

        b, t, h, d = q.shape
        try:
            plan = tiling.choose_tiling(t, d, v.shape[-1], batch=b, heads=h, block_size=block_size,
                                        interpret=interpret)
        except NotImplementedError:
            if requested != "auto":
                raise
        else:
            return prefill.lightning_attention_pallas(q, k, v, slope, initial_state, tiling=plan)
    if impl == "recurrent":
        return reference.lightning_attention_recurrent(q, k, v, slope, initial_state)
    return reference.lightning_attention_blocked(q, k, v, slope, initial_state,
                                                 block_size=min(block_size, XLA_MAX_BLOCK))


def lightning_decode(q, k, v, slope, state, *, impl: str = "auto", interpret: bool | None = None):
    """One token per sequence: S' = λ S + kᵀ v, o = q S'. q, k, v `[batch, heads, head_dim]`; returns (o, S').

    The Pallas kernel aliases the state input to the new-state output: donate it to update it in place.
    """
    requested, impl = impl, resolve_impl(impl)
    if (requested == "auto" and impl == "pallas" and jax.default_backend() != "tpu"
            and not os.environ.get(IMPL_ENV) and q.shape[0] > GPU_PALLAS_DECODE_MAX_BATCH):
        impl = "xla"
    if impl == "pallas":
        from m1jax.pallas_kernels.lightning import decode, tiling

        try:
            plan = tiling.choose_tiling(1, q.shape[-1], v.shape[-1], interpret=interpret)
        except NotImplementedError:
            if requested != "auto":
                raise
        else:
            return decode.lightning_decode_pallas(q, k, v, slope, state, tiling=plan)
    return reference.lightning_decode_reference(q, k, v, slope, state)
