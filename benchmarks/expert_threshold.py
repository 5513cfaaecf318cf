"""expert_threshold: the expert work a lower threshold saves in one MoE layer (bench-small widths, CPU).

For T tokens routed by a random router (logits of std ≈ 1, so the top-2 weights are uneven as in a trained model)
and each threshold τ: the fraction of (token, expert) assignments kept, the tokens that used one expert, the expert
FLOPs saved (the routing log's count), the rows the sorted implementations multiply (Σ group sizes) and the tiles
`experts_tiled` computes, and the wall time of the layer with the tiled implementation (the CPU one; XLA:CPU lowers
`ragged_dot` densely, so the ragged path's saving shows only on GPU/TPU).

    PYTHONPATH=. python benchmarks/expert_threshold.py [--tokens 2048]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import machine, table, timeit
from m1jax.config import ModelConfig
from m1jax.modules import moe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--thresholds", default="1.0,0.9,0.8,0.7,0.6,0.5")
    args = ap.parse_args()
    c = ModelConfig.from_preset("bench-small")
    d, e, k = c.hidden_size, c.num_local_experts, c.num_experts_per_tok
    layer = moe.MoE(c.replace(initializer_range=1.0 / np.sqrt(d)), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (1, args.tokens, d))
    a = args.tokens * k
    g = moe.tile_size(a, e)
    tiled = jax.jit(lambda x, tau: layer(x, threshold_BxL=tau, impl="tiled")[0])
    stats_fn = jax.jit(lambda x, tau: layer(x, threshold_BxL=tau)[1])
    rows = []
    for tau in (float(t) for t in args.thresholds.split(",")):
        tau_BxL = jnp.full((1, args.tokens), tau)
        s = stats_fn(x, tau_BxL)
        sizes_E = np.asarray(s["tokens_per_expert"]).astype(int)
        total = float(s["expert_flops"] + s["expert_flops_saved"])
        ms = 1e3 * timeit(lambda: tiled(x, tau_BxL), repeat=7)
        rows.append([tau, f"{sizes_E.sum() / a:.3f}", f"{float(s['experts_used_frac'][0]):.3f}",
                     f"{100 * float(s['expert_flops_saved']) / total:.1f}%", int(sizes_E.sum()),
                     int(np.sum(-(-sizes_E // g))), f"{ms:.1f}"])
    print(machine())
    print(f"one MoE layer, D={d} F={c.intermediate_size} E={e} k={k}, {args.tokens} tokens, tile {g} rows")
    print(table(["τ", "kept", "1-expert tokens", "FLOPs saved", "sorted rows", "tiles", "tiled ms"],
                rows))


if __name__ == "__main__":
    main()
