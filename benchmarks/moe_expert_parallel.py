"""One real-size MiniMax-M1 MoE layer compiled deviceless for a TPU slice: GSPMD (global sort) vs expert parallel.

For each mesh and token count, the layer's forward (router + experts) is compiled twice, with
`moe_parallel="off"` (GSPMD partitions the single-device MoE) and `"auto"` (`moe.expert_parallel`), and the
table gives per chip: temporary memory, bytes all-gathered of expert weights, bytes of (ragged) all-to-all (a
ragged all-to-all counts its whole receive buffer, the dropless worst case), all collective bytes, the compiler's
FLOPs (a grouped GEMM counted over its whole static row buffer, again the worst case) and the expert FLOPs each
chip would do with perfectly balanced routing and no duplicated work. Needs libtpu (see
`m1jax.topology.LIBTPU_HINT`); run as

    env JAX_PLATFORMS=cpu TPU_ACCELERATOR_TYPE=v5p-8 TPU_WORKER_HOSTNAMES=localhost TPU_SKIP_MDS_QUERY=1 \\
        .venv-tpu/bin/python benchmarks/moe_expert_parallel.py [--topology v5p-128] [--cases ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

CASES = ("expert=8,tensor=4,data=2:16x256", "fsdp=8,tensor=4,expert=2:16x256", "expert=16,tensor=4:16x256",
         "expert=8,tensor=4,data=2:1x4096", "expert=16,tensor=4:128x1")


def parse_mesh(text: str) -> dict[str, int]:
    """"expert=8,tensor=4" → {"expert": 8, "tensor": 4}."""
    try:
        return {k.strip(): int(v) for k, v in (p.split("=") for p in text.split(","))}
    except ValueError:
        raise ValueError(f"bad mesh {text!r}: expected axis=size pairs, e.g. expert=8,tensor=4") from None


def mesh_over(devices, shape: dict[str, int]):
    """An m1jax mesh over `devices` (a TPU torus: physical axes may be split to fit the shape)."""
    import jax
    import numpy as np
    from jax.experimental import mesh_utils

    from m1jax.sharding import MESH_AXES

    sizes = tuple(shape.get(a, 1) for a in MESH_AXES)
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {shape} needs {int(np.prod(sizes))} devices, the slice has {len(devices)}")
    grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def compile_layer(devices, mesh_shape: dict[str, int], batch: int, length: int, moe_parallel: str,
                  preset: str = "minimax-m1-80k") -> dict:
    """Compile one MoE layer of `preset` (bf16, `moe_impl="ragged"`: what "auto" picks on TPU for these sizes)
    on `batch` sequences of `length` tokens and measure its HLO."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from m1jax import hlo_collectives
    from m1jax.config import ModelConfig
    from m1jax.modules.moe import MoE
    from m1jax.sharding import named_sharding

    config = ModelConfig.from_preset(preset).replace(dtype="bfloat16", param_dtype="bfloat16", moe_impl="ragged",
                                                     moe_parallel=moe_parallel)
    mesh = mesh_over(devices, mesh_shape)
    abstract = nnx.eval_shape(lambda: MoE(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    state = jax.tree.map(
        lambda v: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=named_sharding(
            v.get_metadata()["logical_axes"], v.shape, mesh))), state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    b, l = batch, length
    x = jax.ShapeDtypeStruct((b, l, config.hidden_size), jnp.bfloat16,
                             sharding=named_sharding(("batch", None, None), (b, l, config.hidden_size), mesh))

    def forward(state, x):
        y, stats = nnx.merge(graphdef, state)(x)
        return y, stats["aux_loss"]

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jax.jit(forward).lower(state, x).compile()
    compile_s = time.perf_counter() - t0
    text = compiled.as_text()
    e, d, f = config.num_local_experts, config.hidden_size, config.intermediate_size
    expert_shapes = [(e, d, f), (e, f, d)]
    by_kind = hlo_collectives.bytes_by_kind(text)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    chips = len(devices)
    ideal = 6 * d * f * b * l * config.num_experts_per_tok / chips  # every chip a distinct share, routing balanced
    return {"mesh": mesh_shape, "batch": b, "length": l, "moe_parallel": moe_parallel, "compile_s": compile_s,
            "temp_bytes": mem.temp_size_in_bytes, "argument_bytes": mem.argument_size_in_bytes,
            "expert_weight_gather_bytes": sum(c.bytes for c in hlo_collectives.all_gathers_of(text, expert_shapes)),
            "all_to_all_bytes": by_kind["all-to-all"] + by_kind["ragged-all-to-all"],
            "ragged_all_to_all": hlo_collectives.counts_by_kind(text)["ragged-all-to-all"],
            "collective_bytes": sum(by_kind.values()), "collective_bytes_by_kind": by_kind,
            "flops": float(cost.get("flops", 0.0)), "ideal_expert_flops": ideal}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5p-128")
    parser.add_argument("--cases", nargs="*", default=list(CASES),
                        help="MESH:BATCHxLENGTH, e.g. expert=8,tensor=4,data=2:16x256")
    parser.add_argument("--parallel", nargs="*", default=["off", "auto"], choices=["off", "auto"])
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of the table")
    args = parser.parse_args(argv)

    from m1jax.topology import topology_devices

    devices = topology_devices(args.topology)  # without libtpu: RuntimeError saying how to get it
    rows = []
    for case in args.cases:
        mesh_text, _, shape = case.rpartition(":")
        b, _, l = shape.partition("x")
        for par in args.parallel:
            r = compile_layer(devices, parse_mesh(mesh_text), int(b), int(l), par)
            if args.json:
                print(json.dumps(r), flush=True)
            rows.append([mesh_text, shape, "GSPMD" if par == "off" else "expert parallel",
                         r["temp_bytes"] / 1e9, r["expert_weight_gather_bytes"] / 1e9, r["all_to_all_bytes"] / 1e9,
                         r["collective_bytes"] / 1e9, r["flops"] / 1e12, r["ideal_expert_flops"] / 1e12])
    if not args.json:
        from benchmarks.common import table

        print(f"one MiniMax-M1 MoE layer (bf16, forward), {args.topology}, deviceless; per chip")
        print(table(["mesh", "batch×length", "MoE", "temp GB", "expert-weight gather GB", "all-to-all GB",
                     "all collectives GB", "TFLOPs (compiler)", "TFLOPs (balanced ideal)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
