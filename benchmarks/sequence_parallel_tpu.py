"""One request at long context with its sequence split over a TPU slice: a (lightning + softmax) decoder-layer
pair of the real MiniMax-M1 (bf16, MoE included) compiled deviceless, for a one-shot prefill of L tokens into
the cache and for one decode step reading an L-slot cache.

Batch 1 leaves the data axes to the sequence (`sharding.RULES["seq"]`): hidden states, the K/V cache and the
attention work are split over them; lightning layers pass decayed states between sequence shards, softmax
layers gather K/V for prefill and combine partial softmaxes for decode. Per chip the table gives: arguments
(weights + cache) and the cache alone, temporaries, collective bytes by kind per step (from the compiled HLO,
see `m1jax.hlo_collectives`) and the largest all-gather. `--part mixers` replaces each MoE by zero, leaving
the token mixers (lightning and softmax attention, norms, embedding, head): what sequence sharding itself
costs. Needs libtpu (see `m1jax.topology.LIBTPU_HINT`); run as

    env JAX_PLATFORMS=cpu TPU_ACCELERATOR_TYPE=v5p-8 TPU_WORKER_HOSTNAMES=localhost TPU_SKIP_MDS_QUERY=1 \\
        .venv-tpu/bin/python benchmarks/sequence_parallel_tpu.py [--topology v5p-64] [--mesh fsdp=8,tensor=4] \\
        [--cases prefill:131072 prefill:1048576 decode:1048576] [--part layers|mixers] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

CASES = ("prefill:131072", "prefill:1048576", "decode:1048576")
MESHES = ("fsdp=8,tensor=4", "fsdp=32")
RESERVE = 1024  # cache slots beyond the prompt in the prefill cases (room for the tokens generated next)


def parse_mesh(text: str) -> dict[str, int]:
    """"fsdp=8,tensor=4" → {"fsdp": 8, "tensor": 4}."""
    try:
        return {k.strip(): int(v) for k, v in (p.split("=") for p in text.split(","))}
    except ValueError:
        raise ValueError(f"bad mesh {text!r}: expected axis=size pairs, e.g. fsdp=8,tensor=4") from None


def parse_case(text: str) -> tuple[str, int]:
    mode, _, length = text.partition(":")
    if mode not in ("prefill", "decode") or not length.isdigit():
        raise ValueError(f"bad case {text!r}: expected prefill:LENGTH or decode:CACHE_SLOTS")
    return mode, int(length)


def compile_case(devices, mesh_shape: dict[str, int], mode: str, length: int, *, lightning_impl: str = "xla",
                 part: str = "layers", preset: str = "minimax-m1-80k") -> dict:
    """Compile the layer pair of `preset` for `mode` ("prefill": `length` tokens into a cache of length + RESERVE
    slots; "decode": one token into a cache of `length` slots) and measure it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from m1jax.modules.moe import MoE

    if part == "mixers":  # the MoE contributes zero (its weights stay in the arguments)
        MoE.__call__ = lambda self, x, **_: (jnp.zeros_like(x), None)

    from m1jax import hlo_collectives
    from m1jax.cache import abstract_cache
    from m1jax.config import ModelConfig
    from m1jax.loading import abstract_sharded_model
    from m1jax.sharding import make_mesh, named_sharding

    config = ModelConfig.from_preset(preset).replace(
        num_hidden_layers=2, layer_types=("linear_attention", "full_attention"), dtype="bfloat16",
        param_dtype="bfloat16", lightning_impl=lightning_impl, moe_impl="ragged")
    mesh = make_mesh(mesh_shape, devices=devices)
    graphdef, params = abstract_sharded_model(config, mesh)
    n_new, slots = (length, length + RESERVE) if mode == "prefill" else (1, length)
    cache = abstract_cache(config, 1, slots, mesh=mesh)
    tokens = jax.ShapeDtypeStruct((1, n_new), jnp.int32, sharding=named_sharding(("batch", "seq"), (1, n_new), mesh))

    def step(params, cache, tokens):
        out = nnx.merge(graphdef, params)(tokens, cache=cache, logits="last")
        return out.logits, out.cache

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jax.jit(step, donate_argnums=(1,)).lower(params, cache, tokens).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    text = compiled.as_text()
    by_kind = hlo_collectives.bytes_by_kind(text)
    gathers = [c for c in hlo_collectives.collectives(text) if c.kind == "all-gather"]
    largest = max(gathers, key=lambda c: c.bytes, default=None)
    cache_bytes = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(cache))
    return {
        "mesh": ",".join(f"{k}={v}" for k, v in mesh_shape.items()), "mode": mode, "length": length, "part": part,
        "chips": len(devices), "compile_s": round(compile_s, 1),
        "argument_gb": mem.argument_size_in_bytes / 1e9, "temp_gb": mem.temp_size_in_bytes / 1e9,
        "output_gb": mem.output_size_in_bytes / 1e9, "alias_gb": mem.alias_size_in_bytes / 1e9,
        "collective_gb": {k: v / 1e9 for k, v in by_kind.items() if v},
        "largest_all_gather": None if largest is None else f"{largest.results[0][0]}{list(largest.results[0][1])}",
        "largest_all_gather_gb": 0.0 if largest is None else largest.bytes / 1e9,
        "cache_gb": cache_bytes / 1e9,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5p-64")
    parser.add_argument("--mesh", nargs="+", default=list(MESHES))
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--lightning-impl", default="xla", choices=("xla", "pallas", "auto"))
    parser.add_argument("--part", default="layers", choices=("layers", "mixers"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from m1jax.topology import topology_devices

    devices = topology_devices(args.topology)  # without libtpu: RuntimeError saying how to get it
    rows = []
    for mesh_text in args.mesh:
        for case in args.cases:
            mode, length = parse_case(case)
            try:
                r = compile_case(devices, parse_mesh(mesh_text), mode, length, lightning_impl=args.lightning_impl,
                                 part=args.part)
            except Exception as e:  # a case that does not compile (e.g. out of HBM) is a result too
                r = {"mesh": mesh_text, "mode": mode, "length": length, "error": f"{type(e).__name__}: {e}"[:300]}
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    from benchmarks.common import table

    out = []
    for r in rows:
        if "error" in r:
            out.append([r["mesh"], r["mode"], r["length"], "—", "—", "—", "—", "—", r["error"][:60]])
            continue
        coll = r["collective_gb"]
        out.append([r["mesh"], r["mode"], r["length"], f"{r['argument_gb']:.2f}", f"{r['cache_gb']:.3f}",
                    f"{r['temp_gb']:.2f}",
                    " ".join(f"{k} {v:.3g}" for k, v in coll.items()) or "0",
                    f"{r['largest_all_gather']} ({r['largest_all_gather_gb']:.3g} GB)", r["compile_s"]])
    what = "MoE included" if args.part == "layers" else "MoE replaced by zero"
    print(f"{args.topology}, {len(devices)} chips, M1-80k layer pair (lightning + softmax, {what}), bf16, batch 1, "
          f"lightning_impl={args.lightning_impl}; GB per chip")
    print(table(["mesh", "mode", "tokens / slots", "arguments", "of which cache", "temp", "collectives (GB by kind)",
                 "largest all-gather", "compile s"], out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
