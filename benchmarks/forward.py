"""Prefill throughput of m1jax vs transformers on the same small config (fp32, CPU), FLOP/s vs the measured
matmul rate, and lightning-attention cost per token from 1K to 64K tokens. Prints markdown tables.

    python benchmarks/forward.py [--preset bench-small] [--seq 2048] [--lengths 1024,4096,16384,65536] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import machine, matmul_flops, table, timeit, transformers_config, transformers_model  # noqa: E402
from m1jax.config import LIGHTNING, ModelConfig  # noqa: E402
from m1jax.model import MiniMaxM1  # noqa: E402
from m1jax.modules.lightning import LightningAttention  # noqa: E402
from m1jax.modules.unfused import XLA_CPU_COMPILER_OPTIONS  # noqa: E402


def forward_flops(c: ModelConfig, t: int) -> float:
    """Model FLOPs of one forward over t tokens (batch 1), MFU-style: 2 per active weight and per LM-head weight,
    lightning attention in its recurrent form (kᵀv and qS: 4·D² per token and head), causal softmax attention
    (QKᵀ and PV over the visible keys). Blocked intra-chunk products are extra work, not counted."""
    per_token = 2 * c.param_counts()["active"] + 2 * c.hidden_size * c.vocab_size
    h, hd = c.num_attention_heads, c.head_dim
    lightning = len(c.lightning_layers) * t * h * 2 * 2 * hd * hd
    softmax = len(c.softmax_layers) * 2 * 2 * h * hd * t * (t + 1) / 2
    return per_token * t + lightning + softmax


def bench_prefill(c: ModelConfig, t: int, rows: list, peak: float, repeats: int):
    import torch

    tokens = np.random.default_rng(0).integers(0, c.vocab_size, (1, t))
    graphdef, params = nnx.split(MiniMaxM1(c, rngs=nnx.Rngs(0)))
    x = jnp.asarray(tokens)

    def forward(p, x):
        return nnx.merge(graphdef, p)(x).logits

    # the engine's options (no YNNPACK dot fusion on CPU) and XLA's defaults, as a user's plain jax.jit gets them
    fwd_opts = jax.jit(forward, compiler_options=XLA_CPU_COMPILER_OPTIONS)
    fwd_default = jax.jit(forward)
    hf = transformers_model(c)
    xt = torch.tensor(tokens)

    def hf_call():
        with torch.no_grad():
            t0 = time.perf_counter()
            hf(xt)
            return time.perf_counter() - t0

    jax.block_until_ready((fwd_opts(params, x), fwd_default(params, x)))
    hf_call()
    # interleaved repeats (the machine's load moves): medians
    samples = [(timeit(lambda: fwd_opts(params, x), warmup=0, repeat=1),
                timeit(lambda: fwd_default(params, x), warmup=0, repeat=1), hf_call()) for _ in range(repeats)]
    t_jax, t_default, t_hf = (float(np.median(col)) for col in zip(*samples, strict=True))
    flops = forward_flops(c, t)
    for name, sec in (("m1jax (XLA, engine options)", t_jax), ("m1jax (XLA, default options)", t_default),
                      ("transformers 5.23 (torch fp32)", t_hf)):
        rows.append([name, f"1 x {t}", round(t / sec), f"{flops / sec / 1e9:.1f}", f"{100 * flops / sec / peak:.0f}%",
                     f"{t_hf / sec:.2f}x"])


def bench_lightning(c: ModelConfig, lengths: list[int], rows: list):
    import torch
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention as HFLightning

    layer = LightningAttention(c, c.lightning_layers[0], rngs=nnx.Rngs(0))
    f = nnx.jit(lambda m, x: m(x)[0])
    hf = HFLightning(transformers_config(c), 0).eval()
    for t in lengths:
        x = jax.random.normal(jax.random.PRNGKey(0), (1, t, c.hidden_size), jnp.float32)
        t_jax = timeit(lambda: f(layer, x), repeat=3)
        xt = torch.randn(1, t, c.hidden_size)
        with torch.no_grad():
            hf(xt, None, None)
            t0 = time.perf_counter()
            reps = 2
            for _ in range(reps):
                hf(xt, None, None)
            t_hf = (time.perf_counter() - t0) / reps
        rows.append([t, f"{1e6 * t_jax / t:.1f}", f"{1e6 * t_hf / t:.1f}", f"{t_hf / t_jax:.2f}x"])
        print(f"  lightning {t}: m1jax {1e6 * t_jax / t:.1f} us/token, transformers {1e6 * t_hf / t:.1f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench-small")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--lengths", default="1024,4096,16384,65536")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    c = ModelConfig.from_preset(args.preset)
    assert all(t == LIGHTNING for t in c.layer_types[:-1])
    print(f"# forward benchmark — {time.strftime('%Y-%m-%d')} — {machine()}")
    peak = matmul_flops()
    print(f"measured fp32 matmul (2048^3, JAX): {peak / 1e9:.1f} GFLOP/s")
    rows: list = []
    bench_prefill(c, args.seq, rows, peak, args.repeats)
    print(table(["implementation", "batch x tokens", "prefill tokens/s", "GFLOP/s", "% of matmul rate",
                 "speed vs transformers"], rows))
    rows = []
    bench_lightning(c, [int(x) for x in args.lengths.split(",") if x], rows)
    print(f"\nlightning attention layer (hidden {c.hidden_size}, {c.num_attention_heads} heads x {c.head_dim}, "
          f"block {c.block_size}; projections + norm + gate included), batch 1:")
    print(table(["tokens", "m1jax us/token", "transformers us/token", "m1jax speed-up"], rows))


if __name__ == "__main__":
    main()
