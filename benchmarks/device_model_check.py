"""Model-level GPU check: the MiniMax model with lightning_impl="pallas" vs "xla" (logits agreement, fp32 and
bf16) and prefill time per implementation on a small config. Part of benchmarks/device_check.sh."""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import table, timeit  # noqa: E402
from m1jax.config import ModelConfig  # noqa: E402
from m1jax.model import MiniMaxM1  # noqa: E402

LENGTHS = tuple(int(x) for x in os.environ.get("M1JAX_CHECK_LENGTHS", "1000,8192").split(","))


def main():
    base = ModelConfig.from_preset("bench-small").replace(num_attention_heads=8, head_dim=128, hf_source_json="{}")
    rows = []
    for dtype in ("float32", "bfloat16"):
        outs, times = {}, {}
        for impl in ("xla", "pallas"):
            c = base.replace(dtype=dtype, param_dtype=dtype, lightning_impl=impl)
            model = MiniMaxM1(c, rngs=nnx.Rngs(0))
            for t in LENGTHS:
                tokens = jnp.asarray(np.random.default_rng(0).integers(0, c.vocab_size, (1, t)))
                fwd = nnx.jit(lambda m, x: m(x).logits)
                outs[(impl, t)] = np.asarray(fwd(model, tokens), np.float64)
                times[(impl, t)] = timeit(lambda: fwd(model, tokens), repeat=5)
        for t in LENGTHS:
            a, b = outs[("pallas", t)], outs[("xla", t)]
            err = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
            rows.append([dtype, t, f"{err:.2e}", f"{1e3 * times[('xla', t)]:.2f}", f"{1e3 * times[('pallas', t)]:.2f}",
                         f"{times[('xla', t)] / times[('pallas', t)]:.2f}x"])
        print(f"done {dtype}", flush=True)
    print(f"model: bench-small with 8 heads x 128, 8 layers (7 lightning : 1 softmax), 8 experts; {jax.devices()[0]}")
    print(table(["dtype", "tokens", "logits rel err pallas vs xla", "xla forward ms", "pallas forward ms",
                 "pallas speed-up"], rows))


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"model check took {time.time() - t0:.1f}s")
