"""Decode throughput of the m1jax engine vs transformers `generate` (same small config, fp32, CPU), decode latency
vs context length (1K / 8K / 32K), the memory-bandwidth floor of a decode step, and chunked prefill of a long
prompt with its peak memory. Prints markdown tables.

    python benchmarks/generate.py [--preset bench-small] [--new 32] [--contexts 1024,8192,32768] [--long 131072]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import machine, read_bandwidth, table, transformers_model  # noqa: E402
from m1jax.config import ModelConfig  # noqa: E402
from m1jax.generation import Engine  # noqa: E402
from m1jax.model import MiniMaxM1  # noqa: E402
from m1jax.sampling import SamplingParams  # noqa: E402

REPEATS = 3


def step_bytes(c: ModelConfig, batch: int, context: int) -> int:
    """Bytes one decode step must read: active weights (experts hit by `batch` tokens, expected), the LM head,
    lightning states (read + write), the softmax K/V of `context` tokens."""
    w = 4  # fp32
    d, h, hd, e, k, f = (c.hidden_size, c.num_attention_heads, c.head_dim, c.num_local_experts,
                         c.num_experts_per_tok, c.intermediate_size)
    experts_hit = e * (1 - (1 - k / e) ** batch)
    attn = len(c.lightning_layers) * (5 * h * hd * d) + len(c.softmax_layers) * (
        2 * h * hd * d + 2 * c.num_key_value_heads * hd * d)
    per_layer = 2 * d + e * d + experts_hit * 3 * d * f
    weights = attn + c.num_hidden_layers * per_layer + d * c.vocab_size + d
    states = batch * len(c.lightning_layers) * h * hd * hd * 2
    kv = batch * len(c.softmax_layers) * 2 * c.num_key_value_heads * hd * context
    return int((weights + states + kv) * w)


def bench_vs_transformers(c, model, batch, new, bw, rows):
    import torch

    prompt = np.random.default_rng(0).integers(0, c.vocab_size, (batch, 32))
    sp = SamplingParams(temperature=0.0, max_new_tokens=new, stop_token_ids=(), repetition_stop=None)
    engine = Engine(model)
    state = engine.prefill(prompt.tolist(), reserve=new)
    engine.decode(state, sp)  # compile for this cache size (the state is not consumed)
    jax.block_until_ready(state.next_logits_BxV)

    def jax_step():
        t0 = time.perf_counter()
        engine.decode(state, sp)
        return (time.perf_counter() - t0) / new

    hf = transformers_model(c)
    x = torch.tensor(prompt)

    def hf_step():
        with torch.no_grad():
            t0 = time.perf_counter()
            hf.generate(x, max_new_tokens=1, do_sample=False, pad_token_id=0, eos_token_id=None)
            t_prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            hf.generate(x, max_new_tokens=new + 1, do_sample=False, pad_token_id=0, eos_token_id=None)
            return (time.perf_counter() - t0 - t_prefill) / new

    with torch.no_grad():
        hf.generate(x, max_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=None)
    # interleaved repeats, so that both see the same machine load; medians
    pairs = [(jax_step(), hf_step()) for _ in range(REPEATS)]
    t_jax = float(np.median([p[0] for p in pairs]))
    t_hf = float(np.median([p[1] for p in pairs]))
    floor = step_bytes(c, batch, 32 + new) / bw
    for name, t in (("m1jax engine", t_jax), ("transformers generate", t_hf)):
        rows.append([name, batch, f"{1e3 * t:.1f}", f"{batch / t:.1f}", f"{t_hf / t:.2f}x", f"{1e3 * floor:.1f}",
                     f"{t / floor:.2f}"])


def bench_context(c, model, contexts, rows):
    engine = Engine(model, prefill_chunk=4096)
    sp = SamplingParams(temperature=0.0, max_new_tokens=16, stop_token_ids=(), repetition_stop=None)
    for n in contexts:
        prompt = np.random.default_rng(1).integers(0, c.vocab_size, (1, n)).tolist()
        state = engine.prefill(prompt, reserve=32)
        engine.decode(state, sp)  # compile for this cache size
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            engine.decode(state, sp)
            times.append((time.perf_counter() - t0) / 16)
        rows.append([n, f"{1e3 * float(np.median(times)):.2f}"])
        print(f"  context {n}: done", flush=True)


LONG_PREFILL = """
import sys, time, resource, numpy as np
sys.path.insert(0, {root!r})
from flax import nnx
from m1jax.config import ModelConfig
from m1jax.model import MiniMaxM1
from m1jax.generation import Engine
c = ModelConfig.from_preset({preset!r})
model = MiniMaxM1(c, rngs=nnx.Rngs(0))
n = {n}
prompt = np.random.default_rng(2).integers(0, c.vocab_size, (1, n)).tolist()
engine = Engine(model, prefill_chunk={chunk})
engine.prefill([prompt[0][:{chunk}]], reserve=1)  # compile
t0 = time.perf_counter()
state = engine.prefill(prompt, reserve=1)
state.next_logits_BxV.block_until_ready()
dt = time.perf_counter() - t0
print(f"RESULT {{n / dt:.1f}} {{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}}")
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench-small")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--contexts", default="1024,8192,32768")
    ap.add_argument("--long", type=int, default=131072)
    ap.add_argument("--chunk", type=int, default=4096)
    args = ap.parse_args()
    c = ModelConfig.from_preset(args.preset)
    model = MiniMaxM1(c, rngs=nnx.Rngs(0))
    print(f"# generation benchmark — {time.strftime('%Y-%m-%d')} — {machine()}")
    bw = read_bandwidth()
    print(f"measured memory read bandwidth (sum over a 512 MiB array): {bw / 1e9:.1f} GB/s")
    rows: list = []
    for batch in (1, 8):
        bench_vs_transformers(c, model, batch, args.new, bw, rows)
    print(table(["implementation", "batch", "ms / step", "tokens/s", "speed vs transformers",
                 "bandwidth floor ms", "x floor"], rows))
    rows = []
    bench_context(c, model, [int(x) for x in args.contexts.split(",") if x], rows)
    print("\ndecode latency vs context (batch 1, greedy):")
    print(table(["context tokens", "ms / step"], rows))
    if args.long:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run([sys.executable, "-c", LONG_PREFILL.format(root=root, preset=args.preset, n=args.long,
                                                                         chunk=args.chunk)],
                             capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
        if line:
            tps, rss = line[0].split()[1:]
            print(f"\nchunked prefill of {args.long} tokens (chunk {args.chunk}): {tps} tokens/s, peak RSS {rss} MiB "
                  f"(whole process, model included)")
        else:
            print("long prefill failed:", out.stderr[-2000:])


if __name__ == "__main__":
    main()
