"""Lightning-attention kernels: Pallas vs the XLA path vs softmax flash attention (and fla), M1 head shape.

Prints markdown tables of forward, forward+backward and decode times with achieved TFLOP/s, GB/s and % of the
peak matmul FLOP/s and copy GB/s measured in the same run. Sections (run in this order, each guarded):

    --check      compiled correctness of the Pallas kernels vs the references (ragged, bf16, grads, decode)
    (default)    prefill table (T = 1K … 64K, 64 heads × 128, batch 1, bf16) and decode table
    --sweep      Pallas tilings (block_t, block_v, warps, segments) at one length, for tuning `tiling.py`
    --fla        flash-linear-attention's `chunk_simple_gla` (torch/Triton) at the same shapes; run it in its
                 own process (JAX_PLATFORMS=cpu) so JAX does not hold the GPU memory
    --v2-check / --v2-bench / --combine    the sections of `benchmarks/device_check_v2.sh` (chunk-parallel
                 forward: correctness, timings vs the sequential forward and XLA, tiling variants; results
                 appended to `--json` files, tables with ratios vs fla printed by `--combine`)

    python benchmarks/lightning_kernels.py [--small] [--check] [--sweep] [--no-bench] [--fla]

On CPU `--small` is implied (2 heads, T ≤ 1024; Pallas runs in interpret mode, so its times mean nothing).
FLOP counts are those of the blocked algorithm at C = 64 (what the GPU kernel executes): forward
4·B·T·H·D·(C + D), forward+backward 3× that; softmax causal forward 2·B·H·T²·D, forward+backward 3.5× that.
GB/s counts the minimum HBM traffic (read q, k, v (+dO), write the outputs (+ grads), states).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback

PROCESS_START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "--fla" in sys.argv or "--combine" in sys.argv:  # torch owns the GPU there; JAX (reference check) on the CPU
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from m1jax.pallas_kernels.lightning import api, reference  # noqa: E402
from m1jax.pallas_kernels.lightning.decode import lightning_decode_pallas  # noqa: E402
from m1jax.pallas_kernels.lightning.prefill import lightning_attention_pallas  # noqa: E402
from m1jax.pallas_kernels.lightning.tiling import choose_tiling  # noqa: E402

from benchmarks.common import copy_bandwidth, machine, matmul_flops, table, timeit  # noqa: E402

M1_HEADS, M1_HEAD_DIM = 64, 128
FLOP_BLOCK = 64
DECODE_STEPS = 16  # decode steps per timed call (amortises dispatch)


def m1_slopes(h: int) -> np.ndarray:
    """ALiBi slopes of a power-of-two head count (spec §3.3), layer 0."""
    return np.array([2.0 ** (-(8.0 / h) * (i + 1)) for i in range(h)], np.float32)


def lightning_flops(b, t, h, d, *, backward=False) -> float:
    fwd = 4.0 * b * t * h * d * (FLOP_BLOCK + d)
    return 3 * fwd if backward else fwd


def softmax_flops(b, t, h, d, *, backward=False) -> float:
    fwd = 2.0 * b * h * t * t * d
    return 3.5 * fwd if backward else fwd


def prefill_bytes(b, t, h, d, itemsize, *, backward=False) -> float:
    n = b * t * h * d * itemsize
    state = b * h * d * d * 4
    return (4 * n + 2 * state) + ((7 * n + 3 * state) if backward else 0)


def section(title):
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            print(f"\n## {title}", flush=True)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            except Exception:  # noqa: BLE001 - a benchmark section must not stop the others
                traceback.print_exc()
                print(f"(section failed: {title})", flush=True)
            finally:
                print(f"[{title}: {time.perf_counter() - t0:.1f} s]", flush=True)
        return run
    return wrap


def inputs(b, t, h, d, dtype, seed=0, *, initial_state=True):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = (jax.random.normal(ks[0], (b, t, h, d)) * d ** -0.5).astype(dtype)
    k = (jax.random.normal(ks[1], (b, t, h, d)) * d ** -0.5).astype(dtype)
    v = jax.random.normal(ks[2], (b, t, h, d)).astype(dtype)
    s0 = jax.random.normal(ks[3], (b, h, d, d), jnp.float32) if initial_state else None
    return q, k, v, jnp.asarray(m1_slopes(h)), s0


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


# ------------------------------------------------------------------------------------------------ implementations

def lightning_impl(impl: str):
    def fn(q, k, v, slope, s0):
        return api.lightning_attention(q, k, v, slope, s0, impl=impl)
    return fn


# The sequential forward's best setting in the H100 tiling sweep at T = 16384 (1.30–1.31 ms).
SEQUENTIAL_BEST = dict(algorithm="sequential", block_v=128, num_warps=8, num_segments=1)


def pallas_tiling_impl(**overrides):
    """Pallas with `choose_tiling(..., **overrides)` for the traced shapes (compiled off CPU)."""
    def fn(q, k, v, slope, s0):
        b, t, h, d = q.shape
        tiling = choose_tiling(t, d, v.shape[-1], batch=b, heads=h, **overrides)
        return lightning_attention_pallas(q, k, v, slope, s0, tiling=tiling)
    return fn


def softmax_impl(implementation):
    def fn(q, k, v, slope, s0):
        del slope, s0
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation), None
    return fn


def forward_fn(fn):
    return jax.jit(lambda q, k, v, slope, s0: fn(q, k, v, slope, s0))


def forward_backward_fn(fn):
    """jit(q, k, v, s0 ↦ grads) of a loss on both outputs (includes the forward)."""

    def grads(q, k, v, slope, s0):
        def f(q, k, v, s0):
            out, final = fn(q, k, v, slope, s0)
            return out, (jnp.zeros((), jnp.float32) if final is None else final)

        (out, final), vjp = jax.vjp(f, q, k, v, s0)
        return vjp((jnp.ones_like(out), jnp.ones_like(final)))

    return jax.jit(grads)


def softmax_available(t, h, d) -> str | None:
    """"cudnn" if cuDNN flash attention runs here, "xla" if the T×T scores fit easily, else None."""
    if jax.default_backend() == "gpu":
        try:
            x = jnp.zeros((1, 128, 2, d), jnp.bfloat16)
            jax.block_until_ready(jax.nn.dot_product_attention(x, x, x, is_causal=True, implementation="cudnn"))
            return "cudnn"
        except Exception as e:  # noqa: BLE001
            print(f"cudnn attention unavailable: {type(e).__name__}: {str(e)[:200]}")
    return "xla" if t * t * h * 4 * 6 <= 8 * 2**30 else None


# ------------------------------------------------------------------------------------------------ sections

@section("environment")
def environment():
    print(machine())
    print("devices:", jax.devices())
    import jaxlib

    print("jax", jax.__version__, "| jaxlib", jaxlib.__version__, "| backend", jax.default_backend(),
          "| python", sys.version.split()[0])


@section("measured peaks")
def peaks(small: bool):
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    n = 1024 if small else 8192
    flops = matmul_flops(n, dtype)
    bw = copy_bandwidth((64 if small else 2048) * 2**20)
    print(f"matmul {n}^3 {jnp.dtype(dtype).name}: {flops / 1e12:.3g} TFLOP/s; copy (read+write): {bw / 1e9:.0f} GB/s")
    return flops, bw


@section("compiled correctness (Pallas vs reference)")
def check():
    interpret = jax.default_backend() == "cpu"
    rows = []

    def record(name, err, tol):
        rows.append([name, f"{err:.2e}", f"{tol:.0e}", "PASS" if err < tol else "FAIL"])
        print(f"  {name}: {err:.2e} (tol {tol:.0e}) {'PASS' if err < tol else 'FAIL'}", flush=True)

    naive = jax.jit(reference.lightning_attention_naive)
    pallas = jax.jit(functools.partial(lightning_attention_pallas, interpret=interpret))
    cases = [  # b, t, h, d, dtype, initial state
        (2, 1000, 4, 128, jnp.float32, True),
        (1, 257, 3, 64, jnp.float32, False),
        (1, 1025 if interpret else 4097, 8, 128, jnp.bfloat16, True),  # auto segmentation on GPU
        (2, 1, 2, 128, jnp.bfloat16, True),
    ]
    for b, t, h, d, dtype, init in cases:
        name = f"fwd b{b} t{t} h{h} d{d} {jnp.dtype(dtype).name}{' s0' if init else ''}"
        try:
            q, k, v, slope, s0 = inputs(b, t, h, d, dtype, seed=t, initial_state=init)
            out, final = pallas(q, k, v, slope, s0)
            ref_out, ref_final = naive(*(x.astype(jnp.float32) for x in (q, k, v)), slope, s0)
            tol = 2e-5 if dtype == jnp.float32 else 2e-2
            record(name + " out", rel_err(out, ref_out), tol)
            record(name + " state", rel_err(final, ref_final), tol)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append([name, "error", "", f"{type(e).__name__}"])

    def loss(fn, q, k, v, s0, slope):
        out, final = fn(q, k, v, slope, s0)
        w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        return jnp.sum(out.astype(jnp.float32) * w) + 0.1 * jnp.sum(jnp.sin(final))

    for b, t, h, d, dtype in [(1, 777, 2, 128, jnp.float32), (2, 300, 2, 64, jnp.bfloat16)]:
        name = f"grad b{b} t{t} h{h} d{d} {jnp.dtype(dtype).name}"
        try:
            q, k, v, slope, s0 = inputs(b, t, h, d, dtype, seed=t)
            got = jax.jit(jax.grad(functools.partial(loss, functools.partial(lightning_attention_pallas,
                                                                             interpret=interpret)),
                                   argnums=(0, 1, 2, 3)))(q, k, v, s0, slope)
            want = jax.jit(jax.grad(functools.partial(loss, reference.lightning_attention_naive),
                                    argnums=(0, 1, 2, 3)))(*(x.astype(jnp.float32) for x in (q, k, v)), s0, slope)
            tol = 2e-5 if dtype == jnp.float32 else 2e-2
            for gname, g, w in zip(("dq", "dk", "dv", "ds0"), got, want):
                record(f"{name} {gname}", rel_err(g, w), tol)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append([name, "error", "", f"{type(e).__name__}"])

    for dtype in (jnp.float32, jnp.bfloat16):
        name = f"decode chain {jnp.dtype(dtype).name}"
        try:
            b, t, h, d = 3, 130, 4, 128
            q, k, v, slope, s0 = inputs(b, t + 2, h, d, dtype, seed=5)
            decode = jax.jit(functools.partial(lightning_decode_pallas, interpret=interpret))
            out, state = pallas(q[:, :t], k[:, :t], v[:, :t], slope, s0)
            outs = [out]
            for i in (t, t + 1):
                ref_o, ref_s = reference.lightning_decode_reference(q[:, i], k[:, i], v[:, i], slope, state)
                o, state_new = decode(q[:, i], k[:, i], v[:, i], slope, state)
                record(f"{name} step vs reference", rel_err(o, ref_o), 2e-5 if dtype == jnp.float32 else 2e-2)
                record(f"{name} state vs reference", rel_err(state_new, ref_s), 2e-5)
                outs.append(o[:, None])
                state = state_new
            ref_out, ref_final = naive(*(x.astype(jnp.float32) for x in (q, k, v)), slope, s0)
            tol = 2e-5 if dtype == jnp.float32 else 2e-2
            record(f"{name} vs long prefill out", rel_err(jnp.concatenate(outs, 1), ref_out), tol)
            record(f"{name} vs long prefill state", rel_err(state, ref_final), tol)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append([name, "error", "", f"{type(e).__name__}"])

    if not interpret:  # long sequence, M1 shape: Pallas vs the XLA path
        try:
            q, k, v, slope, s0 = inputs(1, 16384, M1_HEADS, M1_HEAD_DIM, jnp.bfloat16, seed=3)
            out, final = pallas(q, k, v, slope, s0)
            x_out, x_final = jax.jit(reference.lightning_attention_blocked)(q, k, v, slope, s0)
            record("fwd t16384 h64 bf16 vs XLA path out", rel_err(out, x_out), 2e-2)
            record("fwd t16384 h64 bf16 vs XLA path state", rel_err(final, x_final), 2e-2)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append(["fwd t16384 vs XLA", "error", "", f"{type(e).__name__}"])
    print(table(["check", "max|err|/max|ref|", "tol", "result"], rows))


@section("prefill: forward and forward+backward")
def bench_prefill(lengths, heads, head_dim, peak_flops, peak_bw, dtype=jnp.bfloat16):
    b, h, d = 1, heads, head_dim
    impls = [("pallas", lightning_impl("pallas")), ("pallas sequential", pallas_tiling_impl(**SEQUENTIAL_BEST)),
             ("xla (blocked)", lightning_impl("xla"))]
    rows = []
    for t in lengths:
        softmax = softmax_available(t, h, d)
        todo = impls + ([(f"softmax ({softmax})", softmax_impl(softmax))] if softmax else [])
        q, k, v, slope, s0 = inputs(b, t, h, d, dtype)
        for name, fn in todo:
            is_softmax = name.startswith("softmax")
            for backward in (False, True):
                mode = "fwd+bwd" if backward else "fwd"
                try:
                    f = (forward_backward_fn if backward else forward_fn)(fn)
                    t0 = time.perf_counter()
                    jax.block_until_ready(f(q, k, v, slope, s0))
                    compile_s = time.perf_counter() - t0
                    sec = timeit(lambda: f(q, k, v, slope, s0), warmup=1, repeat=5)
                except Exception as e:  # noqa: BLE001
                    print(f"  {name} T={t} {mode}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    rows.append([t, name, mode, "error", "", "", "", ""])
                    continue
                flops = (softmax_flops if is_softmax else lightning_flops)(b, t, h, d, backward=backward)
                nbytes = prefill_bytes(b, t, h, d, jnp.dtype(dtype).itemsize, backward=backward)
                row = [t, name, mode, f"{sec * 1e3:.3f}", f"{flops / sec / 1e12:.3g}",
                       f"{100 * flops / sec / peak_flops:.0f}%", f"{nbytes / sec / 1e9:.0f}", f"{compile_s:.1f}"]
                rows.append(row)
                print("  " + " | ".join(str(x) for x in row), flush=True)
    print(f"\nprefill, batch {b}, {h} heads x {d}, {jnp.dtype(dtype).name}; TFLOP/s on the blocked-C=64 count "
          f"(softmax: causal count)")
    print(table(["T", "implementation", "pass", "ms", "TFLOP/s", "% peak FLOP/s", "GB/s", "compile s"], rows))


def softmax_decode_steps(implementation):
    """jit(qs [S, B, H, D], K/V cache [B, T, H, D]) ↦ S single-query attention steps over the cache."""

    @jax.jit
    def attend(qs, kc, vc):
        def step(carry, q):
            return carry, jax.nn.dot_product_attention(q[:, None], kc, vc, implementation=implementation)
        return jax.lax.scan(step, 0, qs)[1]

    return attend


@section("decode: one token per sequence")
def bench_decode(batches, contexts, heads, head_dim, peak_bw, dtype=jnp.bfloat16):
    h, d = heads, head_dim
    rows = []
    interpret = jax.default_backend() == "cpu"

    def lightning_steps(decode_fn):
        @jax.jit
        def run(qs, ks, vs, slope, state):
            def step(state, x):
                o, state = decode_fn(*x, slope, state)
                return state, o
            state, outs = jax.lax.scan(step, state, (qs, ks, vs))
            return outs, state
        return run

    for b in batches:
        ks = jax.random.split(jax.random.PRNGKey(b), 4)
        qs, kk, vs = (jax.random.normal(kx, (DECODE_STEPS, b, h, d)).astype(dtype) for kx in ks[:3])
        state = jax.random.normal(ks[3], (b, h, d, d), jnp.float32)
        slope = jnp.asarray(m1_slopes(h))
        state_bytes = b * h * d * d * 4
        for name, fn in (("lightning pallas", functools.partial(lightning_decode_pallas, interpret=interpret)),
                         ("lightning xla", reference.lightning_decode_reference)):
            try:
                f = lightning_steps(fn)
                sec = timeit(lambda: f(qs, kk, vs, slope, state), warmup=1, repeat=5) / DECODE_STEPS
                nbytes = 2 * state_bytes + 4 * b * h * d * jnp.dtype(dtype).itemsize
                rows.append([b, name, "any", f"{sec * 1e6:.1f}", f"{nbytes / sec / 1e9:.0f}",
                             f"{100 * nbytes / sec / peak_bw:.0f}%"])
            except Exception as e:  # noqa: BLE001
                print(f"  {name} b={b}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                rows.append([b, name, "any", "error", "", ""])
            print("  " + " | ".join(str(x) for x in rows[-1]), flush=True)
        for t in contexts:
            if b * t * h * d * 2 * 2 > 16 * 2**30:
                continue
            impl = "cudnn" if jax.default_backend() == "gpu" else None
            try:
                kc = jax.random.normal(ks[0], (b, t, h, d)).astype(dtype)
                vc = jax.random.normal(ks[1], (b, t, h, d)).astype(dtype)
                attend = softmax_decode_steps(impl)
                try:
                    jax.block_until_ready(attend(qs, kc, vc))
                except Exception:  # noqa: BLE001 - cuDNN may not take a single query: plain XLA then
                    impl = None
                    attend = softmax_decode_steps(impl)
                    jax.block_until_ready(attend(qs, kc, vc))
                sec = timeit(lambda: attend(qs, kc, vc), warmup=1, repeat=5) / DECODE_STEPS
                nbytes = 2 * b * t * h * d * jnp.dtype(dtype).itemsize
                rows.append([b, f"softmax ({impl or 'xla'}), KV cache", t, f"{sec * 1e6:.1f}",
                             f"{nbytes / sec / 1e9:.0f}", f"{100 * nbytes / sec / peak_bw:.0f}%"])
            except Exception as e:  # noqa: BLE001
                print(f"  softmax decode b={b} T={t}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                rows.append([b, "softmax, KV cache", t, "error", "", ""])
            print("  " + " | ".join(str(x) for x in rows[-1]), flush=True)
    print(f"\ndecode, {h} heads x {d}, {jnp.dtype(dtype).name} q/k/v, fp32 lightning state; time per step "
          f"({DECODE_STEPS} steps in one jit); GB/s = state read+write (lightning) / KV-cache read (softmax)")
    print(table(["batch", "implementation", "context", "us/step", "GB/s", "% peak GB/s"], rows))


@section("Pallas tiling sweep")
def sweep(t, heads, head_dim, peak_flops, dtype=jnp.bfloat16):
    b, h, d = 1, heads, head_dim
    q, k, v, slope, s0 = inputs(b, t, h, d, dtype)
    base = choose_tiling(t, d, d, batch=b, heads=h)
    print("default:", base)
    seq = dict(algorithm="sequential")
    variants = [dict(), *CHUNK_VARIANTS, seq, dict(seq, block_v=128, num_warps=8),
                dict(seq, block_v=128, num_warps=8, num_segments=1), dict(seq, block_t=32)]
    with_backward = [variants[0], variants[-3]]  # fwd+bwd only for the likeliest defaults (compiles ~10 s each)
    rows = []
    for over in variants:
        tiling = choose_tiling(t, d, d, batch=b, heads=h, **over)
        for backward in (False, True) if over in with_backward else (False,):
            fn = functools.partial(lightning_attention_pallas, tiling=tiling)
            try:
                f = (forward_backward_fn if backward else forward_fn)(fn)
                sec = timeit(lambda: f(q, k, v, slope, s0), warmup=1, repeat=5)
            except Exception as e:  # noqa: BLE001
                print(f"  {over} {'fwd+bwd' if backward else 'fwd'}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            flops = lightning_flops(b, t, h, d, backward=backward)
            row = [str(over or "default"), tiling.algorithm, tiling.block_t, tiling.block_v, tiling.num_warps,
                   tiling.num_segments, tiling.state_chunk, "fwd+bwd" if backward else "fwd", f"{sec * 1e3:.3f}",
                   f"{flops / sec / 1e12:.3g}", f"{100 * flops / sec / peak_flops:.0f}%"]
            rows.append(row)
            print("  " + " | ".join(str(x) for x in row), flush=True)
    print(f"\nPallas tilings at T={t}, batch {b}, {h} heads x {d}, {jnp.dtype(dtype).name}")
    print(table(["override", "algorithm", "block_t", "block_v", "warps", "segments", "state_chunk", "pass", "ms",
                 "TFLOP/s", "% peak"], rows))


def torch_standin_simple_gla(q, k, v, g_gamma, scale, initial_state, output_final_state):
    """CPU stand-in for fla's `chunk_simple_gla` (same signature subset and math; the blocked algorithm in torch,
    C = 64), so that `--fla --small` exercises the benchmark code where there is no GPU / Triton."""
    import torch

    b, t, h, d = q.shape
    lam = torch.exp(g_gamma.float())  # λ per head
    state = initial_state.float().clone()
    out = torch.empty(b, t, h, v.shape[-1], dtype=q.dtype)
    c = 64
    for s in range(0, t, c):
        qi, ki, vi = (x[:, s:s + c].float().transpose(1, 2) for x in (q, k, v))  # [b, h, m, d]
        m = qi.shape[2]
        i = torch.arange(m, dtype=torch.float32)
        diff = i[:, None] - i[None, :]
        lam_h = lam[:, None, None]
        mask = torch.where(diff >= 0, lam_h ** diff.clamp(min=0), torch.zeros(()))
        o = ((qi @ ki.transpose(-1, -2)) * scale * mask) @ vi + (qi * lam_h ** (i[:, None] + 1)) @ state * scale
        out[:, s:s + m] = o.transpose(1, 2).to(q.dtype)
        state = lam_h[None] ** m * state + (ki * lam_h ** (m - 1 - i[:, None])).transpose(-1, -2) @ vi
    return out, (state if output_final_state else None)


@section("flash-linear-attention chunk_simple_gla (torch)")
def bench_fla(lengths, heads, head_dim, *, warmup=1, repeat=5, fwd_only=False, log=None, standin=False):
    """fla's chunk_simple_gla at `lengths` (the first call at the first length autotunes fla's kernels: put the
    most important length first), then a small correctness check against the JAX reference on the CPU."""
    import torch

    log = log or ResultLog(None)
    if standin:
        chunk_simple_gla, dev = torch_standin_simple_gla, "cpu"
        print("(stand-in: torch blocked algorithm on the CPU, NOT fla)")
    else:
        from fla.ops.simple_gla import chunk_simple_gla
        dev = "cuda"
        print("torch", torch.__version__, "| fla from", sys.modules["fla"].__file__)
    impl_name = "fla chunk_simple_gla" + (" (CPU stand-in)" if standin else "")

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def device_time(fn, repeat):
        times = []
        for _ in range(repeat):
            if dev == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return float(np.median(times))

    rows = []
    h, d = heads, head_dim
    # Same function as ours: g_gamma = log λ = −slope, scale = 1 (checked against the JAX reference below).
    g_gamma = -torch.tensor(m1_slopes(h), device=dev)
    for t in lengths:
        gen = torch.Generator(device=dev).manual_seed(t)
        tq, tk, tv = (torch.randn(1, t, h, d, device=dev, generator=gen, dtype=torch.float32).to(torch.bfloat16) * s
                      for s in (d ** -0.5, d ** -0.5, 1.0))
        ts0 = torch.randn(1, h, d, d, device=dev, generator=gen, dtype=torch.float32)
        for backward in (False,) if fwd_only else (False, True):
            def run():
                xs = [x.detach().requires_grad_(backward) for x in (tq, tk, tv, ts0)]
                o, ht = chunk_simple_gla(*xs[:3], g_gamma=g_gamma, scale=1.0, initial_state=xs[3],
                                         output_final_state=True)
                if backward:
                    (o.float().sum() + ht.sum()).backward()
            mode = "fwd+bwd" if backward else "fwd"
            try:
                t0 = time.perf_counter()
                for _ in range(max(warmup, 1)):
                    run()
                sync()
                first = time.perf_counter() - t0
                sec = device_time(run, repeat)
            except Exception as e:  # noqa: BLE001
                print(f"  fla T={t} {mode}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                log.add(kind="time", impl=impl_name, t=t, mode=mode, ms=None, error=type(e).__name__)
                continue
            flops = lightning_flops(1, t, h, d, backward=backward)
            nbytes = prefill_bytes(1, t, h, d, 2, backward=backward)
            log.add(kind="time", impl=impl_name, t=t, mode=mode, ms=sec * 1e3, compile_s=first,
                    tflops=flops / sec / 1e12, gbs=nbytes / sec / 1e9)
            row = [t, impl_name, mode, f"{sec * 1e3:.3f}", f"{flops / sec / 1e12:.3g}", f"{nbytes / sec / 1e9:.0f}",
                   f"{first:.1f}"]
            rows.append(row)
            print("  " + " | ".join(str(x) for x in row), flush=True)
    print(f"\nfla baseline, batch 1, {h} heads x {d}, bf16 (FLOP count of the blocked algorithm; GB/s = q, k, v, o "
          f"+ states only: a lower bound of the traffic)")
    print(table(["T", "implementation", "pass", "ms", "TFLOP/s", "GB/s (min traffic)", "first call(s) s"], rows))

    # correctness of the baseline (after the timings, so that fla autotunes at the benchmark's lengths)
    b, t = 1, 300
    q, k, v, slope, s0 = inputs(b, t, h, d, jnp.bfloat16, seed=1)
    ref_out, ref_final = jax.jit(reference.lightning_attention_naive)(
        *(x.astype(jnp.float32) for x in (q, k, v)), slope, s0)
    tq, tk, tv = (torch.tensor(np.asarray(x.astype(jnp.float32)), device=dev).bfloat16() for x in (q, k, v))
    o, ht = chunk_simple_gla(tq, tk, tv, g_gamma=-torch.tensor(np.asarray(slope), device=dev), scale=1.0,
                             initial_state=torch.tensor(np.asarray(s0), device=dev), output_final_state=True)
    err_o, err_s = rel_err(o.float().cpu().numpy(), ref_out), rel_err(ht.float().cpu().numpy(), ref_final)
    print(f"fla vs JAX reference (bf16 inputs, T={t}, max|err|/max|ref|): out {err_o:.2e}, state {err_s:.2e}")
    log.add(kind="check", name=f"{impl_name} vs reference T={t} bf16 out", err=err_o, tol=2e-2, ok=err_o < 2e-2)
    log.add(kind="check", name=f"{impl_name} vs reference T={t} bf16 state", err=err_s, tol=2e-2, ok=err_s < 2e-2)


# ------------------------------------------------------------------------------------------------ device check v2
# `benchmarks/device_check_v2.sh`: the chunk-parallel forward vs the sequential one, XLA and fla, in ≤ 200 s.
# Every measurement is appended at once to a JSON-lines file (a timed-out section keeps what it measured);
# `--combine` prints the tables from those files.

V2_LENGTHS = (16384, 4096, 65536)   # in order of importance (a timeout cuts the tail)
V2_SMALL_LENGTHS = (512, 256, 1024)
V2_BACKWARD_LENGTH = 16384
# chunk_parallel tilings timed at the backward length after the main table, most informative first. All fit
# an H100's shared memory with a margin (checked offline: pallas_kernels/lightning/offline_triton_check.py).
CHUNK_VARIANTS = [
    dict(state_chunk=64, chunk_block_v=128, chunk_num_warps=8),    # fla's layout: a state per 64 tokens
    dict(state_chunk=64, chunk_block_v=64, chunk_num_warps=4),
    dict(chunk_block_v=128, chunk_num_warps=8),                    # states every 128, 1 CTA/SM
    dict(state_chunk=64, chunk_block_v=128, chunk_num_warps=8, chunk_group=4),  # pipelined output loop
    dict(state_block_v=32, state_num_stages=2),                    # 2x state-pass programs
    dict(state_block_t=128),                                       # half the state-pass steps
    dict(state_num_warps=8),
    dict(state_block_k=32, state_block_v=32, state_num_stages=2),  # 4x state-pass programs
]


class ResultLog:
    """Appends one JSON object per measurement to `path` (nothing without a path)."""

    def __init__(self, path):
        self.path = path

    def add(self, **row):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def _time_impl(log, name, fn, q, k, v, slope, s0, t, *, backward=False, repeat=10, extra=None):
    """Compile + time one implementation; log it; returns the outputs of the first call (None on failure)."""
    mode = "fwd+bwd" if backward else "fwd"
    b, _, h, d = q.shape
    try:
        f = (forward_backward_fn if backward else forward_fn)(fn)
        t0 = time.perf_counter()
        first = jax.block_until_ready(f(q, k, v, slope, s0))
        compile_s = time.perf_counter() - t0
        sec_call = timeit(lambda: f(q, k, v, slope, s0), warmup=1, repeat=repeat)  # median of blocked calls
        t0 = time.perf_counter()  # back-to-back calls, one block: hides the dispatch like fla's CUDA events
        for _ in range(repeat):
            out = f(q, k, v, slope, s0)
        jax.block_until_ready(out)
        sec = (time.perf_counter() - t0) / repeat
        del out
    except Exception as e:  # noqa: BLE001
        print(f"  {name} T={t} {mode}: {type(e).__name__}: {str(e)[:400]}", flush=True)
        log.add(kind="time", impl=name, t=t, mode=mode, ms=None, error=f"{type(e).__name__}: {str(e)[:200]}",
                **(extra or {}))
        return None
    flops = lightning_flops(b, t, h, d, backward=backward)
    nbytes = prefill_bytes(b, t, h, d, q.dtype.itemsize, backward=backward)
    log.add(kind="time", impl=name, t=t, mode=mode, ms=sec * 1e3, ms_call=sec_call * 1e3, compile_s=compile_s,
            tflops=flops / sec / 1e12, gbs=nbytes / sec / 1e9, **(extra or {}))
    print(f"  {name} | T={t} | {mode} | {sec * 1e3:.3f} ms ({sec_call * 1e3:.3f} per blocked call) | "
          f"{flops / sec / 1e12:.3g} TFLOP/s | {nbytes / sec / 1e9:.0f} GB/s (min traffic) | compile {compile_s:.1f} s",
          flush=True)
    return first


@section("v2: compiled correctness of the chunk-parallel forward")
def check_v2(small, log):
    interpret = jax.default_backend() == "cpu"
    naive = jax.jit(reference.lightning_attention_naive)
    cases = [  # b, t, h, d, dtype, initial state
        (1, 1000, 4, 128, jnp.float32, True),
        (1, 300 if small else 4097, 2 if small else 8, 128, jnp.bfloat16, True),
        (2, 257, 3, 128, jnp.bfloat16, True),
    ]

    def record(name, err, tol):
        ok = bool(err < tol)
        log.add(kind="check", name=name, err=err, tol=tol, ok=ok)
        print(f"  {name}: {err:.2e} (tol {tol:.0e}) {'PASS' if ok else 'FAIL'}", flush=True)

    for b, t, h, d, dtype, init in cases:
        name = f"chunk fwd b{b} t{t} h{h} d{d} {jnp.dtype(dtype).name}{' s0' if init else ''}"
        try:
            tiling = choose_tiling(t, d, d, batch=b, heads=h, interpret=interpret)
            assert tiling.algorithm == "chunk_parallel", tiling
            q, k, v, slope, s0 = inputs(b, t, h, d, dtype, seed=t, initial_state=init)
            out, final = jax.jit(functools.partial(lightning_attention_pallas, tiling=tiling))(q, k, v, slope, s0)
            ref_out, ref_final = naive(*(x.astype(jnp.float32) for x in (q, k, v)), slope, s0)
            tol = 2e-5 if dtype == jnp.float32 else 2e-2
            record(name + " out", rel_err(out, ref_out), tol)
            record(name + " state", rel_err(final, ref_final), tol)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            log.add(kind="check", name=name, err=None, tol=None, ok=False, error=type(e).__name__)

    def loss(fn, q, k, v, s0, slope):
        out, final = fn(q, k, v, slope, s0)
        w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        return jnp.sum(out.astype(jnp.float32) * w) + 0.1 * jnp.sum(jnp.sin(final))

    b, t, h, d, dtype = 1, 200 if small else 777, 2, 128, jnp.float32
    name = f"chunk fwd+bwd (custom_vjp) b{b} t{t} h{h} d{d} float32 s0"
    try:
        tiling = choose_tiling(t, d, d, batch=b, heads=h, interpret=interpret)
        assert tiling.algorithm == "chunk_parallel", tiling
        q, k, v, slope, s0 = inputs(b, t, h, d, dtype, seed=t)
        pallas = functools.partial(lightning_attention_pallas, tiling=tiling)
        got = jax.jit(jax.grad(functools.partial(loss, pallas), argnums=(0, 1, 2, 3)))(q, k, v, s0, slope)
        want = jax.jit(jax.grad(functools.partial(loss, reference.lightning_attention_naive),
                                argnums=(0, 1, 2, 3)))(q, k, v, s0, slope)
        for gname, g, w in zip(("dq", "dk", "dv", "ds0"), got, want):
            record(f"{name} {gname}", rel_err(g, w), 2e-5)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        log.add(kind="check", name=name, err=None, tol=None, ok=False, error=type(e).__name__)


@section("v2: forward timings (chunk-parallel vs sequential vs XLA), fwd+bwd, chunk tilings")
def bench_v2(small, log, *, repeat=10, variants=True, budget_s=None):
    """Main table first, then fwd+bwd, the chunk tiling variants, the sequential fwd+bwd; with `budget_s`
    (seconds since the process started) no new measurement starts once the budget is spent."""
    b, h, d = 1, (2 if small else M1_HEADS), M1_HEAD_DIM

    def over_budget(what):
        if budget_s is not None and time.perf_counter() - PROCESS_START > budget_s:
            print(f"  (time budget of {budget_s} s spent: skipping {what})", flush=True)
            log.add(kind="skipped", what=what)
            return True
        return False

    dtype = jnp.bfloat16
    lengths = V2_SMALL_LENGTHS if small else V2_LENGTHS
    bwd_t = lengths[0] if small else V2_BACKWARD_LENGTH
    try:
        peak_flops = matmul_flops(1024 if small else 8192, jnp.float32 if small else dtype)
        peak_bw = copy_bandwidth((64 if small else 2048) * 2**20)
        log.add(kind="peak", tflops=peak_flops / 1e12, gbs=peak_bw / 1e9)
        print(f"  matmul {peak_flops / 1e12:.3g} TFLOP/s; copy (read+write) {peak_bw / 1e9:.0f} GB/s", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"  peaks: {type(e).__name__}: {e}", flush=True)
    default = choose_tiling(bwd_t, d, d, batch=b, heads=h)
    log.add(kind="tiling", t=bwd_t, tiling=repr(default))
    print(f"  default tiling at T={bwd_t}: {default}", flush=True)
    impls = [("pallas chunk_parallel", pallas_tiling_impl()),
             ("pallas sequential (block_v=128, 8 warps, 1 segment)", pallas_tiling_impl(**SEQUENTIAL_BEST)),
             ("xla blocked", lightning_impl("xla"))]
    for t in lengths:
        q, k, v, slope, s0 = inputs(b, t, h, d, dtype)
        outs = {}
        for name, fn in impls:
            if not over_budget(f"{name} T={t}"):
                outs[name] = _time_impl(log, name, fn, q, k, v, slope, s0, t, repeat=repeat)
        ref = outs.get("xla blocked")
        for name in [n for n, _ in impls[:2] if outs.get(n) is not None and ref is not None]:
            for what, x, r in (("out", outs[name][0], ref[0]), ("state", outs[name][1], ref[1])):
                err = rel_err(x, r)
                log.add(kind="check", name=f"{name} vs xla blocked T={t} bf16 {what}", err=err, tol=2e-2,
                        ok=bool(err < 2e-2))
                print(f"  {name} vs xla blocked T={t} {what}: {err:.2e}", flush=True)
        del q, k, v, outs, ref
    q, k, v, slope, s0 = inputs(b, bwd_t, h, d, dtype)
    if not over_budget("pallas chunk_parallel fwd+bwd"):
        _time_impl(log, "pallas chunk_parallel", impls[0][1], q, k, v, slope, s0, bwd_t, backward=True,
                   repeat=repeat)
    for over in CHUNK_VARIANTS if variants else []:
        name = "pallas chunk_parallel " + ",".join(f"{k_}={v_}" for k_, v_ in over.items())
        if not over_budget(name):
            _time_impl(log, name, pallas_tiling_impl(**over), q, k, v, slope, s0, bwd_t, repeat=repeat,
                       extra=dict(variant=over))
    if not over_budget(impls[1][0] + " fwd+bwd"):
        _time_impl(log, impls[1][0], impls[1][1], q, k, v, slope, s0, bwd_t, backward=True, repeat=repeat)


def _read_jsonl(paths):
    rows = []
    for path in paths:
        if not os.path.exists(path):
            print(f"(no results file {path})")
            continue
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        print(f"(unreadable line in {path}: {line[:100]})")
    return rows


def combine(paths):
    """Print the combined markdown tables of a device_check_v2 run (ratios: fla ms / ms, > 1 = faster than fla)."""
    rows = _read_jsonl(paths)
    times = [r for r in rows if r.get("kind") == "time"]
    fla = {(r["t"], r["mode"]): r["ms"] for r in times if r["impl"].startswith("fla") and r.get("ms")}
    print("\n## combined: lightning attention forward, batch 1, M1 heads (64 x 128 on the GPU), bf16")
    for r in rows:
        if r.get("kind") == "peak":
            print(f"measured peaks: matmul {r['tflops']:.3g} TFLOP/s, copy {r['gbs']:.0f} GB/s")
        if r.get("kind") == "tiling":
            print(f"default tiling at T={r['t']}: {r['tiling']}")

    def fmt_row(r):
        ms = r.get("ms")
        ratio = fla.get((r["t"], r["mode"]))
        call = r.get("ms_call")
        return [r["t"], r["impl"], r["mode"], f"{ms:.3f}" if ms else "error", f"{call:.3f}" if call else "",
                f"{ratio / ms:.2f}x" if ms and ratio else "",
                f"{r['tflops']:.3g}" if ms else "", f"{r['gbs']:.0f}" if ms else "",
                f"{r['compile_s']:.1f}" if ms else r.get("error", "")[:60]]

    main_rows = [r for r in times if "variant" not in r]
    main_rows.sort(key=lambda r: (r["mode"], r["t"], r["impl"].startswith("fla"), r["impl"]))
    headers = ["T", "implementation", "pass", "ms", "ms per blocked call", "speed vs fla (fla ms / ms)",
               "TFLOP/s", "GB/s (min traffic)", "compile / first call s"]
    print("ms: JAX = 10 back-to-back calls / 10 (dispatch hidden), fla = median of CUDA-event-timed calls")
    print(table(headers, [fmt_row(r) for r in main_rows]))
    variant_rows = [r for r in times if "variant" in r]
    if variant_rows:
        print("\nchunk_parallel tiling variants (forward):")
        base = [r for r in main_rows if r["impl"] == "pallas chunk_parallel" and r["mode"] == "fwd"
                and r["t"] == variant_rows[0]["t"]]
        print(table(headers, [fmt_row(r) for r in base + variant_rows]))
    checks = [r for r in rows if r.get("kind") == "check"]
    failed = [r for r in checks if not r.get("ok")]
    print(f"\ncorrectness: {len(checks) - len(failed)}/{len(checks)} checks passed")
    for r in checks:
        err = r.get("err")
        detail = f"error {r.get('error', '')}" if err is None else f"{err:.2e} (tol {r['tol']:.0e})"
        print(f"  {'PASS' if r.get('ok') else 'FAIL'} {r['name']}: {detail}")
    goal = []
    for (t, mode), fla_ms in sorted(fla.items()):
        ours = [r for r in times if r["impl"] == "pallas chunk_parallel" and r["t"] == t and r["mode"] == mode
                and r.get("ms") and "variant" not in r]
        best = min([r for r in times if r["impl"].startswith("pallas chunk_parallel") and r["t"] == t
                    and r["mode"] == mode and r.get("ms")], key=lambda r: r["ms"], default=None)
        if ours:
            goal.append(f"T={t} {mode}: default {fla_ms / ours[0]['ms']:.2f}x"
                        + (f", best tiling {fla_ms / best['ms']:.2f}x ({best['impl']})" if best else ""))
    print("\ngoal (chunk_parallel forward >= 1.0x fla at T >= 8K): " + ("; ".join(goal) if goal else "no fla numbers"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="small sizes (implied on CPU)")
    ap.add_argument("--check", action="store_true", help="compiled correctness checks first")
    ap.add_argument("--sweep", action="store_true", help="Pallas tiling sweep")
    ap.add_argument("--no-bench", action="store_true", help="skip the prefill/decode tables")
    ap.add_argument("--fla", action="store_true", help="only the flash-linear-attention baseline (torch)")
    ap.add_argument("--lengths", default=None, help="comma-separated T, default 1024,4096,16384,65536")
    ap.add_argument("--v2-check", action="store_true", help="device check v2: chunk-parallel correctness")
    ap.add_argument("--v2-bench", action="store_true", help="device check v2: timings")
    ap.add_argument("--combine", nargs="+", metavar="JSONL", help="print the v2 tables from result files")
    ap.add_argument("--json", default=None, help="append results (JSON lines) to this file")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--fwd-only", action="store_true", help="--fla: forward only")
    ap.add_argument("--standin", action="store_true", help="--fla: a torch CPU stand-in instead of fla (dry runs)")
    ap.add_argument("--no-variants", action="store_true", help="--v2-bench: skip the chunk tiling variants")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="--v2-bench: start no new measurement after this many seconds (since process start)")
    args = ap.parse_args()
    if args.combine:
        combine(args.combine)
        return
    # --fla runs torch on the GPU with JAX kept on the CPU, so the JAX backend says nothing about its sizes
    small = args.small or (args.standin if args.fla else jax.default_backend() == "cpu")
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else (
        [256, 1024] if small else [1024, 4096, 16384, 65536])
    heads = 2 if small else M1_HEADS
    log = ResultLog(args.json)
    print(f"# lightning attention kernels — {time.strftime('%Y-%m-%d %H:%M')}")
    if args.fla:
        bench_fla(lengths, heads, M1_HEAD_DIM, warmup=args.warmup, repeat=args.repeat, fwd_only=args.fwd_only,
                  log=log, standin=args.standin)
        return
    environment()
    if args.v2_check or args.v2_bench:
        if args.v2_check:
            check_v2(small, log)
        if args.v2_bench:
            bench_v2(small, log, repeat=args.repeat, variants=not args.no_variants, budget_s=args.budget_s)
        return
    if args.check:
        check()
    if args.no_bench and not args.sweep:
        return
    measured = peaks(small) or (float("nan"), float("nan"))
    peak_flops, peak_bw = measured
    if not args.no_bench:
        bench_prefill(lengths, heads, M1_HEAD_DIM, peak_flops, peak_bw)
        bench_decode([1, 16] if small else [1, 128], [lengths[-1]] if small else [4096, 65536], heads,
                     M1_HEAD_DIM, peak_bw)
    if args.sweep:
        sweep(lengths[-1] if small else 16384, heads, M1_HEAD_DIM, peak_flops)


if __name__ == "__main__":
    main()
