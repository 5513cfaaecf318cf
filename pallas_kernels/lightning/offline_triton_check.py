"""Compile the lightning-attention Pallas kernels for an H100 (sm_90a) WITHOUT a GPU and report per kernel:
registers, spills, shared memory, resident CTAs / warps per SM and whether loads are pipelined (cp.async) —
for choosing `tiling.py` defaults and sweep variants before a (scarce) device run.

The Pallas → Triton-IR lowering is JAX's own (as on the GPU); the IR is then compiled with a pip Triton and
its bundled ptxas. Numbers are indicative: XLA's bundled Triton on the device may allocate a little
differently, so keep a margin under the 227 KiB shared-memory limit. Needs a Triton wheel in a separate
folder (not the project venv; ~600 MB), e.g.

    /work/venv/bin/pip install --target /tmp/triton_site triton==3.5.1
    PYTHONPATH=. python -m m1jax.pallas_kernels.lightning.offline_triton_check --triton-site /tmp/triton_site \\
        --variant "{}" --variant "{'state_chunk': 64, 'chunk_block_v': 128, 'chunk_num_warps': 8}" [--grads]

Each --variant is a dict of `choose_tiling` overrides (shapes: --seq, --heads, --dim, batch 1, --dtype).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tempfile

H100_SMEM_PER_SM = 233472      # bytes (228 KiB); one CTA may use at most 232448 (227 KiB)
H100_SMEM_PER_CTA = 232448
H100_REGS_PER_SM = 65536
H100_MAX_WARPS_PER_SM = 64


def dump_kernels(variants, *, seq, heads, dim, dtype_name, grads, out_dir):
    """Lower the forward (or fwd+bwd) for each variant; write every kernel's Triton IR; return job dicts."""
    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import pallas_call_registration as registration
    from m1jax.pallas_kernels.lightning.prefill import lightning_attention_pallas
    from m1jax.pallas_kernels.lightning.tiling import choose_tiling

    captured = []
    lower = registration.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        captured.append((result.module.operation.get_asm(enable_debug_info=False), list(result.grid)))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = capture
    dtype = {"bf16": jnp.bfloat16, "f32": jnp.float32}[dtype_name]
    jobs = []
    try:
        for index, overrides in enumerate(variants):
            tiling = choose_tiling(seq, dim, dim, batch=1, heads=heads, interpret=False, **overrides)
            tiling = dataclasses.replace(tiling, interpret=False)
            q = jax.ShapeDtypeStruct((1, seq, heads, dim), dtype)
            slope = jax.ShapeDtypeStruct((heads,), jnp.float32)
            s0 = jax.ShapeDtypeStruct((1, heads, dim, dim), jnp.float32)
            fn = functools.partial(lightning_attention_pallas, tiling=tiling)
            captured.clear()
            if grads:
                def loss(q, k, v, slope, s0):
                    out, final = fn(q, k, v, slope, s0)
                    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(final)
                traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4))).trace(q, q, q, slope, s0)
            else:
                traced = jax.jit(fn).trace(q, q, q, slope, s0)
            traced.lower(lowering_platforms=("cuda",))
            for k, (text, grid) in enumerate(captured):
                name = text.split("tt.func public @")[1].split("(")[0]
                if "states" in name:
                    warps, stages = tiling.state_num_warps, tiling.state_num_stages
                elif tiling.algorithm == "chunk_parallel" and name in ("lightning_forward", "lightning_backward_dq"):
                    warps, stages = tiling.chunk_num_warps, tiling.chunk_num_stages
                else:
                    warps, stages = tiling.num_warps, tiling.num_stages
                path = os.path.join(out_dir, f"v{index}_{k}_{name}.ttir")
                with open(path, "w") as f:
                    f.write(text)
                jobs.append(dict(variant=repr(overrides), name=name, path=path, grid=grid, warps=warps,
                                 stages=stages))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
    return jobs


def compile_jobs(jobs):
    """(In a process with the pip Triton importable.) Compile each job for sm_90a; print one line per kernel."""
    import triton
    from triton.backends.compiler import GPUTarget

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    target = GPUTarget("cuda", 90, 32)
    last_variant = None
    for job in jobs:
        if job["variant"] != last_variant:
            print(f"\nvariant {job['variant']}")
            last_variant = job["variant"]
        try:
            kernel = triton.compile(job["path"], target=target,
                                    options=dict(num_warps=job["warps"], num_stages=job["stages"]))
            ptx = kernel.asm["ptx"]
            with tempfile.TemporaryDirectory() as tmp:
                ptx_path = os.path.join(tmp, "k.ptx")
                with open(ptx_path, "w") as f:
                    f.write(ptx)
                report = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx_path, "-o", os.path.join(tmp, "k.cubin")],
                                        capture_output=True, text=True).stderr
            regs = int(re.search(r"Used (\d+) registers", report).group(1))
            spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
            smem = int(kernel.metadata.shared)
            threads = 32 * job["warps"]
            by_regs = H100_REGS_PER_SM // (-(-regs // 8) * 8 * threads)
            by_smem = H100_SMEM_PER_SM // (smem + 1024)
            ctas = min(by_regs, by_smem, H100_MAX_WARPS_PER_SM // job["warps"])
            status = "OK  " if smem <= H100_SMEM_PER_CTA else "SMEM"
            mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma" if "mma.sync" in ptx else "fma")
            pipelined = ptx.count("cp.async.cg") + ptx.count("cp.async.ca")
            print(f"  {status} {job['name']:32s} warps {job['warps']} stages {job['stages']} | regs {regs:3d} "
                  f"spill {spills:5d} B | smem {smem // 1024:3d} KiB | {ctas} CTA/SM ({ctas * job['warps']} warps) | "
                  f"{mma} | cp.async {pipelined} | grid {job['grid']}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"  FAIL {job['name']}: {type(e).__name__}: {str(e)[:500]}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--triton-site", default="/tmp/triton_site", help="folder with a pip-installed triton")
    ap.add_argument("--variant", action="append", default=None, help="choose_tiling overrides (a dict literal)")
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", choices=("bf16", "f32"), default="bf16")
    ap.add_argument("--grads", action="store_true", help="forward + backward kernels")
    ap.add_argument("--compile-jobs", default=None, help=argparse.SUPPRESS)  # internal: the Triton subprocess
    args = ap.parse_args()
    if args.compile_jobs:
        with open(args.compile_jobs) as f:
            compile_jobs(json.load(f))
        return
    variants = [ast.literal_eval(v) for v in (args.variant or ["{}"])]
    with tempfile.TemporaryDirectory() as tmp:
        jobs = dump_kernels(variants, seq=args.seq, heads=args.heads, dim=args.dim, dtype_name=args.dtype,
                            grads=args.grads, out_dir=tmp)
        jobs_path = os.path.join(tmp, "jobs.json")
        with open(jobs_path, "w") as f:
            json.dump(jobs, f)
        print(f"T={args.seq}, {args.heads} heads x {args.dim}, {args.dtype}, batch 1; H100 limits: "
              f"{H100_SMEM_PER_CTA // 1024} KiB shared memory per CTA, {H100_REGS_PER_SM} registers per SM")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([args.triton_site, os.environ.get("PYTHONPATH", "")]))
        subprocess.run([sys.executable, "-m", "m1jax.pallas_kernels.lightning.offline_triton_check", "--compile-jobs",
                        jobs_path], env=env, check=False)


if __name__ == "__main__":
    main()
