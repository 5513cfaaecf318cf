"""The decode-step products on CPU, each against its plain form measured in the same run (fp32, jitted):

1. 48 chained single-row products x·W (W 512×1024, 2 MiB each, distinct): `x @ W` vs `linear` (split along K
   into a batch of two half-products);
2. the MoE of 8 layers at one token, top-2 of 8 experts (bench-small sizes) inside a loop of 8 steps:
   `experts_gather` vs `experts_switch` on stacked weights vs `experts_switch` on unstacked (tuple) weights.

Prints one markdown table; effective GB/s counts the weight bytes each product must read once.

    python benchmarks/decode_products.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import machine, read_bandwidth, table, timeit  # noqa: E402
from m1jax.modules import moe  # noqa: E402
from m1jax.modules.unfused import linear  # noqa: E402


def chained_gemv(rows: list):
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.standard_normal((512, 1024), np.float32) * 0.03) for _ in range(48)]
    x = jnp.ones((1, 512), jnp.float32)
    nbytes = 48 * 512 * 1024 * 4

    def chain(product):
        def f(x, ws):
            for w in ws:
                x = jax.lax.optimization_barrier(jnp.tanh(product(x, w)[:, :512]))
            return x
        return jax.jit(f)

    base = None
    for name, product in (("x @ W", lambda x, w: x @ w), ("linear (K split in 2)", linear)):
        f = chain(product)
        t = timeit(lambda: f(x, ws), repeat=15)
        base = base or t
        rows.append(["48 chained 512×1024 GEMVs", name, f"{1e3 * t:.2f}", f"{nbytes / t / 1e9:.1f}",
                     f"{base / t:.2f}x"])


def moe_decode(rows: list):
    layers, steps, e, d, f = 8, 8, 8, 512, 1024
    rng = np.random.default_rng(1)

    def w(shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32) * 0.03)

    stacked = [(w((e, d, f)), w((e, d, f)), w((e, f, d))) for _ in range(layers)]
    tuples = [tuple(tuple(m[i] for i in range(e)) for m in layer) for layer in stacked]
    gates = [w((d, e)) * 30 for _ in range(layers)]
    x0 = jnp.ones((1, d), jnp.float32)
    nbytes = steps * layers * 2 * 3 * d * f * 4

    def loop(impl):
        def run(x, weights, gates):
            def body(_, x):
                for (w1, w3, w2), g in zip(weights, gates, strict=True):
                    _, wts, idx = moe.route(x, g, 2)
                    x = x + 0.1 * impl(x, w1, w3, w2, wts, idx)
                    x = x / jnp.sqrt(jnp.mean(x * x) + 1e-5)
                return x
            return jax.lax.fori_loop(0, steps, body, x)
        return jax.jit(run)

    base = None
    for name, impl, weights in (("gather (stacked)", moe.experts_gather, stacked),
                                ("switch (stacked)", moe.experts_switch, stacked),
                                ("switch (unstacked)", moe.experts_switch, tuples)):
        fn = loop(impl)
        t = timeit(lambda: fn(x0, weights, gates), repeat=7) / steps
        base = base or t
        rows.append(["MoE of 8 layers, 1 token, top-2 of 8", name, f"{1e3 * t:.2f}", f"{nbytes / steps / t / 1e9:.1f}",
                     f"{base / t:.2f}x"])


def main():
    print(f"# decode products — {machine()}")
    print(f"measured memory read bandwidth (sum over a 512 MiB array): {read_bandwidth() / 1e9:.1f} GB/s")
    rows: list = []
    chained_gemv(rows)
    moe_decode(rows)
    print(table(["workload", "implementation", "ms", "effective GB/s", "speed-up vs first row"], rows))


if __name__ == "__main__":
    main()
