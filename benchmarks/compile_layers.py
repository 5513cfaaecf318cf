"""Deviceless TPU compile of the real MiniMax-M1 config: scanned vs unrolled layers.

For each layer count: compile seconds (lower + compile), program code size
(`memory_analysis().generated_code_size_in_bytes`), temporaries and arguments per chip, for the bf16 forward
over `--batch` × `--seq` tokens on a v5p slice (fsdp × tensor mesh); "CPU s" is the process CPU time of the
compile (all threads), steadier than wall seconds on a shared machine. With `--backward N`: the temporaries of
`jax.grad` of an N-layer model under each remat policy. Nothing is allocated; libtpu compiles for TPU here.

    JAX_PLATFORMS=cpu TPU_ACCELERATOR_TYPE=v5p-8 TPU_WORKER_HOSTNAMES=localhost TPU_SKIP_MDS_QUERY=1 \\
    ALLOW_MULTIPLE_LIBTPU_LOAD=1 PYTHONPATH=. .venv-tpu/bin/python benchmarks/compile_layers.py \\
        --layers 8 80 --modes scan unrolled --backward 8
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from m1jax.topology import LIBTPU_HINT, deviceless_env, libtpu_available  # noqa: E402

for _k, _v in {**deviceless_env(), "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}.items():
    os.environ.setdefault(_k, _v)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from m1jax.config import REMAT_POLICIES, ModelConfig  # noqa: E402
from m1jax.loading import abstract_sharded_model  # noqa: E402
from m1jax.sharding import make_mesh  # noqa: E402
from m1jax.topology import topology_devices  # noqa: E402

GB = 1e9


def m1_config(layers: int, scan: bool, remat: str = "none") -> ModelConfig:
    base = ModelConfig.from_preset("minimax-m1-80k", dtype="bfloat16", param_dtype="bfloat16",
                                   lightning_impl="xla", moe_impl="ragged")
    return base.replace(num_hidden_layers=layers, layer_types=base.layer_types[:layers], scan_layers=scan,
                        remat=remat)


def compile_once(config: ModelConfig, mesh, batch: int, seq: int, backward: bool):
    graphdef, state = abstract_sharded_model(config, mesh)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec("fsdp", None)))

    def forward(params, t):
        return nnx.merge(graphdef, params)(t, logits="last").logits

    def loss(params, t):
        return jnp.mean(nnx.merge(graphdef, params)(t, logits="last").logits)

    fn = jax.grad(loss) if backward else forward
    t0, c0 = time.perf_counter(), time.process_time()
    with jax.set_mesh(mesh):
        compiled = jax.jit(fn).lower(state, tokens).compile()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    mem = compiled.memory_analysis()
    row = {"compile_s": seconds, "cpu_s": cpu_seconds, "code_gb": mem.generated_code_size_in_bytes / GB,
           "temp_gb": mem.temp_size_in_bytes / GB, "args_gb": mem.argument_size_in_bytes / GB,
           "host_temp_gb": getattr(mem, "host_temp_size_in_bytes", 0) / GB}
    del compiled
    gc.collect()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="*", default=[8, 80])
    ap.add_argument("--modes", nargs="*", default=["scan", "unrolled"], choices=["scan", "unrolled"])
    ap.add_argument("--backward", type=int, default=0, help="layers of the backward remat comparison (0: skip)")
    ap.add_argument("--policies", nargs="*", default=list(REMAT_POLICIES), choices=list(REMAT_POLICIES))
    ap.add_argument("--topology", default="v5p-128")
    ap.add_argument("--mesh", default="fsdp=16,tensor=4")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    if not libtpu_available():
        sys.exit(LIBTPU_HINT)
    jax.default_backend = lambda: "tpu"  # as on a real TPU host: kernels and remat choose by backend
    shape = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
    mesh = make_mesh(shape, devices=topology_devices(args.topology))
    print(f"# {args.topology}, mesh {shape}, bf16, tokens {args.batch}x{args.seq}, jax {jax.__version__}")
    print(f"{'pass':9} {'layers':>6} {'layout':9} {'remat':9} {'compile s':>9} {'CPU s':>7} {'code GB':>8} "
          f"{'temp GB':>8} "
          f"{'host GB':>8} {'args GB':>8}")

    def show(kind, layers, layout, remat, r):
        print(f"{kind:9} {layers:>6} {layout:9} {remat:9} {r['compile_s']:9.1f} {r['cpu_s']:7.1f} {r['code_gb']:8.3f} "
              f"{r['temp_gb']:8.2f} {r['host_temp_gb']:8.2f} {r['args_gb']:8.2f}", flush=True)

    for layers in args.layers:
        for mode in args.modes:
            config = m1_config(layers, mode == "scan")
            show("forward", layers, "scan" if config.scan_groups else "unrolled", "none",
                 compile_once(config, mesh, args.batch, args.seq, backward=False))
    if args.backward:
        for policy in args.policies:
            config = m1_config(args.backward, True, policy)
            try:
                r = compile_once(config, mesh, args.batch, args.seq, backward=True)
            except Exception as e:  # report and go on (e.g. a policy the compiler rejects)
                print(f"backward {args.backward:>6} scan      {policy:9} failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            show("backward", args.backward, "scan" if config.scan_groups else "unrolled", policy, r)


if __name__ == "__main__":
    main()
