"""Shared helpers of the benchmark scripts: timing, machine peak measurement, table printing."""

from __future__ import annotations

import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp


def timeit(fn, *, warmup: int = 1, repeat: int = 5, min_time: float = 0.0) -> float:
    """Median wall seconds of `fn()` (blocking on its JAX result) after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_flops(n: int = 2048, dtype=jnp.float32) -> float:
    """Measured FLOP/s of an n×n×n matmul in JAX on the default device."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    return 2 * n**3 / timeit(lambda: f(a), repeat=5)


def copy_bandwidth(nbytes: int = 256 * 2**20) -> float:
    """Measured bytes/s of reading + writing an array (x * 1.0001) on the default device (counts both)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda v: v * 1.0001)
    return 2 * nbytes / timeit(lambda: f(x), repeat=5)


def read_bandwidth(nbytes: int = 512 * 2**20) -> float:
    """Measured bytes/s of reading an array once (a sum over it) on the default device."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    return nbytes / timeit(lambda: f(x), repeat=5)


def machine() -> str:
    dev = jax.devices()[0]
    return (f"{platform.node() or 'host'}: {dev.platform} {getattr(dev, 'device_kind', '')}, "
            f"{os.cpu_count()} CPU cores, jax {jax.__version__}")


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(x):
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def transformers_config(config):
    """transformers' `MiniMaxConfig` for an m1jax config (baseline only; torch/transformers are test extras)."""
    from transformers import MiniMaxConfig

    d = config.replace(hf_spelling="transformers", hf_source_json="{}").to_hf_dict()
    for key in ("rotary_dim", "postnorm"):
        d.pop(key, None)
    return MiniMaxConfig(**d)


def transformers_model(config, seed: int = 0):
    """A random fp32 transformers `MiniMaxForCausalLM` of the same shape, in eval mode."""
    import torch
    from transformers import MiniMaxForCausalLM

    torch.manual_seed(seed)
    return MiniMaxForCausalLM(transformers_config(config)).eval()
