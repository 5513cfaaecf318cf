"""int8 experts: accuracy on random models and memory, measured and compiled for TPU without a TPU.

Parts (each prints a table):
  accuracy  CPU: logits of a random 2-layer model (realistic per-channel widths: D, F as given) — int8 experts
            vs bf16 weights, bf16 vs fp32 for scale; and one MoE block at M1's real widths (D=6144, F=9216).
  memory    the expert weight bytes of the real MiniMax-M1-80k, bf16 vs int8 (+ scales), from abstract shapes.
  compile   deviceless v5p compile (run with the libtpu venv and `m1jax.topology.deviceless_env`) of one real
            M1 MoE block and of a one-layer M1 model decode step (batch B, cache L), bf16 vs int8: per-chip
            argument / temp / output bytes from the TPU compiler's `memory_analysis()`.

    PYTHONPATH=. python benchmarks/int8_experts.py accuracy
    PYTHONPATH=. python benchmarks/int8_experts.py memory
    PYTHONPATH=. env JAX_PLATFORMS=cpu TPU_ACCELERATOR_TYPE=v5p-8 TPU_WORKER_HOSTNAMES=localhost \\
        TPU_SKIP_MDS_QUERY=1 ALLOW_MULTIPLE_LIBTPU_LOAD=1 .venv-tpu/bin/python benchmarks/int8_experts.py compile
"""

from __future__ import annotations

import argparse
import time

import numpy as np

GB = 1e9


def _table(rows, header):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------- accuracy (CPU)
def accuracy(args) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from m1jax.config import ModelConfig
    from m1jax.loading import build_from_views
    from m1jax.model import MiniMaxM1
    from m1jax.modules import moe
    from m1jax.quantize import quantize_int8, quantize_views

    def flat(model):
        return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    rows = []
    d, f, e = args.hidden, args.intermediate, args.experts
    heads = d // 128
    for std in args.std:
        config = ModelConfig.from_preset("tiny").replace(
            vocab_size=4096, hidden_size=d, intermediate_size=f, num_local_experts=e, num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 4), head_dim=128, rotary_dim=64, num_hidden_layers=2,
            layer_types=("linear_attention", "full_attention"), initializer_range=std, block_size=256)
        fp32 = MiniMaxM1(config, rngs=nnx.Rngs(0))
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, args.seq)))
        params = flat(fp32)
        del fp32
        logits = {}
        for name, runtime, quantize in (("fp32", {}, None), ("int8 (fp32 compute)", {}, "int8-experts"),
                                        ("bf16", {"dtype": "bfloat16", "param_dtype": "bfloat16"}, None),
                                        ("int8", {"dtype": "bfloat16", "param_dtype": "bfloat16"}, "int8-experts")):
            views = quantize_views(params) if quantize else params
            model = build_from_views(config.replace(quantize=quantize, **runtime), views)
            logits[name] = np.asarray(nnx.jit(lambda m, t: m(t, moe_impl="tiled").logits)(model, tokens))
            del model
        rows.append([f"model D={d} F={f} E={e} std={std}", f"{_rel(logits['int8'], logits['bf16']):.2e}",
                     f"{_rel(logits['int8 (fp32 compute)'], logits['fp32']):.2e}",
                     f"{_rel(logits['bf16'], logits['fp32']):.2e}"])

    # one MoE block at the real widths, weights N(0, std²), tokens N(0, 1)
    d, f, e, k, t = 6144, 9216, 2, 2, 64
    key = jax.random.split(jax.random.PRNGKey(1), 5)
    std = args.std[0]
    gate = 0.02 * jax.random.normal(key[0], (d, e))
    x = jax.random.normal(key[1], (t, d))
    _, wts, idx = moe.route(x, gate, k)
    out = {}
    ws = [std * jax.random.normal(key[2 + i], shape) for i, shape in enumerate(((e, d, f), (e, d, f), (e, f, d)))]
    out["fp32"] = moe.experts_dense(x, *ws, wts, idx)
    bf = [w.astype(jnp.bfloat16) for w in ws]
    out["bf16"] = moe.experts_dense(x.astype(jnp.bfloat16), *bf, wts.astype(jnp.bfloat16), idx)
    qs = [quantize_int8(w) for w in bf]
    out["int8"] = moe.experts_dense(x.astype(jnp.bfloat16), *(q for q, _ in qs), wts.astype(jnp.bfloat16), idx,
                                    scales=tuple(s for _, s in qs))
    del ws, bf
    out["int8 (fp32 compute)"] = moe.experts_dense(x, *(q for q, _ in qs), wts, idx, scales=tuple(s for _, s in qs))
    rows.append([f"MoE block D={d} F={f} E={e} T={t}", f"{_rel(out['int8'], out['bf16']):.2e}",
                 f"{_rel(out['int8 (fp32 compute)'], out['fp32']):.2e}", f"{_rel(out['bf16'], out['fp32']):.2e}"])
    print(f"backend {jax.default_backend()}; relative L2 error of the output (logits / MoE output)")
    _table(rows, ["case", "int8 vs bf16", "int8 vs fp32 (fp32 compute)", "bf16 vs fp32"])


# --------------------------------------------------------------------------- memory (abstract shapes)
def expert_bytes(config) -> tuple[int, int]:
    """(expert weight bytes incl. scales, all parameter bytes) of `config` from the abstract model."""
    from flax import nnx

    from m1jax.loading import abstract_model
    from m1jax.modules.moe import EXPERT_SCALES, EXPERT_WEIGHTS

    _, state = abstract_model(config)
    experts = total = 0
    for path, var in nnx.to_flat_state(state):
        x = var.get_value()
        nbytes = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        total += nbytes
        if path[-2:-1] == ("block_sparse_moe",) and path[-1] in EXPERT_WEIGHTS + EXPERT_SCALES:
            experts += nbytes
    return experts, total


def memory(args) -> None:
    from m1jax.config import ModelConfig

    rows = []
    base = ModelConfig.from_preset(args.model, dtype="bfloat16", param_dtype="bfloat16")
    ref = None
    for quantize in (None, "int8-experts"):
        experts, total = expert_bytes(base.replace(quantize=quantize))
        ref = ref or experts
        rows.append([quantize or "bf16", f"{experts / GB:.1f}", f"{experts / ref:.4f}", f"{total / GB:.1f}",
                     f"{total / 8 / GB:.1f}"])
    print(f"{args.model}: parameter memory (GB = 1e9 bytes)")
    _table(rows, ["experts", "expert GB", "ratio", "all params GB", "per chip of 8 (GB)"])


# --------------------------------------------------------------------------- deviceless TPU compile
def _stats(compiled, seconds) -> dict:
    m = compiled.memory_analysis()
    return {"args": m.argument_size_in_bytes, "temp": m.temp_size_in_bytes, "out": m.output_size_in_bytes,
            "code": m.generated_code_size_in_bytes, "s": seconds}


def compile_moe(config, mesh, tokens: int) -> dict:
    """Compile one MoE block on `tokens` tokens (batch `tokens`, one position: decode-shaped)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from m1jax.loading import _AbstractRngs, param_shardings
    from m1jax.modules.moe import MoE

    graphdef, state = nnx.split(nnx.eval_shape(lambda: MoE(config, rngs=_AbstractRngs())))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                         param_shardings(state, mesh))
    x = jax.ShapeDtypeStruct((tokens, 1, config.hidden_size), jnp.bfloat16,
                             sharding=NamedSharding(mesh, PartitionSpec()))

    def f(state, x):
        return nnx.merge(graphdef, state)(x)[0]

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jax.jit(f).lower(state, x).compile()
    return _stats(compiled, time.perf_counter() - t0)


def compile_decode(config, mesh, batch: int, context: int, layers: int) -> dict:
    """Compile a decode step (one token per sequence, cache of `context`) of M1's first `layers` layers (1: one
    softmax layer), parameters and cache laid out by the rules table."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from m1jax.cache import abstract_cache
    from m1jax.loading import abstract_sharded_model

    types = ("full_attention",) if layers == 1 else config.layer_types[:layers]
    config = config.replace(num_hidden_layers=layers, layer_types=types)
    graphdef, state = abstract_sharded_model(config, mesh)
    cache = abstract_cache(config, batch, context, mesh=mesh)
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))

    def step(state, tokens, cache):
        out = nnx.merge(graphdef, state)(tokens, cache=cache, logits="last")
        return out.logits, out.cache

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jax.jit(step, donate_argnums=(2,)).lower(state, tokens, cache).compile()
    return _stats(compiled, time.perf_counter() - t0)


def compile_tpu(args) -> None:
    import jax

    from m1jax.config import ModelConfig
    from m1jax.sharding import make_mesh
    from m1jax.topology import parse_topology, topology_devices

    topo = parse_topology(args.topology)
    devices = topology_devices(topo)
    print(f"{topo.name}: {len(devices)} × {devices[0].device_kind}, jax backend {jax.default_backend()}")
    rows = []
    for mesh_shape in args.mesh:
        axes = dict(kv.split("=") for kv in mesh_shape.split(","))
        mesh = make_mesh({a: int(n) for a, n in axes.items()}, devices)
        for quantize in (None, "int8-experts"):
            config = ModelConfig.from_preset(args.model, dtype="bfloat16", param_dtype="bfloat16",
                                             quantize=quantize)

            def impl(tokens, c=config):
                """"tpu": what "auto" picks on TPU for the whole expert stack (a deviceless process reports the cpu
                backend); "auto" under an expert/tensor mesh: the expert-parallel MoE picks per shard by the
                mesh's platform."""
                if args.moe_impl != "tpu":
                    return c.replace(moe_impl=args.moe_impl)
                small = tokens * c.num_experts_per_tok <= c.num_local_experts
                return c.replace(moe_impl="gather" if small else "ragged")

            cases = [(f"MoE block, {t} tokens ({impl(t).moe_impl})", lambda t=t: compile_moe(impl(t), mesh, t))
                     for t in args.tokens]
            cases += [(f"{n}-layer decode B={args.batch} L={args.context} ({impl(args.batch).moe_impl})",
                       lambda n=n: compile_decode(impl(args.batch), mesh, args.batch, args.context, n))
                      for n in args.decode_layers]
            for name, run in cases:
                try:
                    s = run()
                except Exception as e:  # noqa: BLE001 — a failed compile is a result to report
                    rows.append([mesh_shape, quantize or "bf16", name, f"failed: {str(e).splitlines()[0][:80]}",
                                 "", "", "", ""])
                    continue
                rows.append([mesh_shape, quantize or "bf16", name, f"{s['args'] / GB:.3f}", f"{s['temp'] / GB:.3f}",
                             f"{s['out'] / GB:.3f}", f"{s['code'] / 1e6:.1f}", f"{s['s']:.1f}"])
                print("  ", rows[-1], flush=True)
    print("per-chip bytes from the TPU compiler's memory_analysis (GB = 1e9)")
    _table(rows, ["mesh", "experts", "program", "args GB", "temp GB", "out GB", "code MB", "compile s"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("--hidden", type=int, default=2048)
    a.add_argument("--intermediate", type=int, default=3072)
    a.add_argument("--experts", type=int, default=8)
    a.add_argument("--seq", type=int, default=64)
    a.add_argument("--std", type=float, nargs="+", default=[0.02])
    a.set_defaults(func=accuracy)
    m = sub.add_parser("memory")
    m.add_argument("--model", default="minimax-m1-80k")
    m.set_defaults(func=memory)
    c = sub.add_parser("compile")
    c.add_argument("--model", default="minimax-m1-80k")
    c.add_argument("--topology", default="v5p-16")
    c.add_argument("--mesh", nargs="+", default=["tensor=8"], help="mesh axes per run, e.g. tensor=8 expert=8")
    c.add_argument("--tokens", type=int, nargs="+", default=[16, 4096], help="MoE block token counts")
    c.add_argument("--batch", type=int, default=16)
    c.add_argument("--context", type=int, default=131072)
    c.add_argument("--decode-layers", type=int, nargs="+", default=[1, 8],
                   help="decode steps of M1's first N layers (1: one softmax layer; 8: one 7+1 period)")
    c.add_argument("--moe-impl", default="tpu", help='"tpu": gather up to E assignments, else ragged')
    c.set_defaults(func=compile_tpu)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
