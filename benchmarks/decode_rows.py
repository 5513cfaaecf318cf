"""Decode step cost by the number of live rows: the scheduler's slot pool vs `Engine.generate` at that batch.

The pool (`--slots` rows, cache `--window` slots) decodes every slot each step; rows without a request run as
padding (no expert FFN, but attention, lightning, LM head and sampling). `Engine.generate` at batch B has only
its B rows. Per count of live rows B: ms per decode step of the pool with B requests (prompts of `--prompt`
tokens, `--new` greedy tokens each, bursts of 4) and of `generate` with the same B prompts (from its per-step
callback), best of `--repeats`. Prints a markdown table.

    python benchmarks/decode_rows.py [--preset bench-small] [--slots 8] [--window 2304] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import machine, table  # noqa: E402
from m1jax.config import ModelConfig  # noqa: E402
from m1jax.generation import HOST_BURST, Engine  # noqa: E402
from m1jax.model import MiniMaxM1  # noqa: E402
from m1jax.sampling import SamplingParams  # noqa: E402
from m1jax.serving import Request, Scheduler  # noqa: E402


def greedy(new: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=new, stop_token_ids=(), repetition_stop=None)


def pool_times(engine: Engine, prompts: list[list[int]], new: int, slots: int, window: int, *,
               prefill_chunk: int = 256, decode_steps: int = 4) -> tuple[float, float]:
    """(seconds of all newcomer prefill chunks, seconds of all decode bursts) of a `slots`-row pool serving one
    request of `new` greedy tokens per prompt, prefills first."""
    s = Scheduler(engine, slots=slots, context_window=window, prefill_chunk=prefill_chunk, decode_steps=decode_steps)
    for p in prompts:
        s.submit(Request(prompt=p, sampling=greedy(new)))
    t = time.perf_counter()
    while s._waiting or s._prefilling is not None:
        s._admit()
        s._prefill_chunk()
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    while s._decode_burst():
        pass
    return prefill, time.perf_counter() - t


def pool_step_ms(engine: Engine, prompts: list[list[int]], new: int, slots: int, window: int) -> float:
    """ms per decode step of a `slots`-row pool with one request per prompt (prefills untimed)."""
    return pool_times(engine, prompts, new, slots, window)[1] / new * 1e3


def generate_step_ms(engine: Engine, prompts: list[list[int]], new: int) -> float:
    """ms per decode step of `Engine.generate` on the prompts: its step callback runs after each burst of
    `HOST_BURST` steps, so from the end of the first burst to the end of the last."""
    stamps: list[float] = []
    engine.generate(prompts, [greedy(new)] * len(prompts), callback=lambda *_: stamps.append(time.perf_counter()))
    return (stamps[-1] - stamps[HOST_BURST - 1]) / (len(stamps) - HOST_BURST) * 1e3


def main(argv=None) -> list[list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bench-small")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--window", type=int, default=2304, help="the pool's context window (cache slots)")
    ap.add_argument("--prompt", type=int, default=100)
    ap.add_argument("--new", type=int, default=64, help="greedy tokens per request (a multiple of 8 > 8)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.new <= HOST_BURST or args.new % HOST_BURST:
        ap.error(f"--new must be a multiple of {HOST_BURST} above {HOST_BURST}, got {args.new}")
    config = ModelConfig.from_preset(args.preset)
    engine = Engine(MiniMaxM1(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    counts = sorted({1 << i for i in range(args.slots.bit_length()) if 1 << i <= args.slots} | {args.slots})
    best = {(k, b): float("inf") for k in ("pool", "generate") for b in counts}
    for r in range(args.repeats + 1):  # round 0 compiles
        for b in counts:
            prompts = [rng.integers(0, config.vocab_size, args.prompt).tolist() for _ in range(b)]
            pool = pool_step_ms(engine, prompts, args.new, args.slots, args.window)
            gen = generate_step_ms(engine, prompts, args.new)
            if r:
                best["pool", b] = min(best["pool", b], pool)
                best["generate", b] = min(best["generate", b], gen)
    rows = [[str(b), f"{best['pool', b]:.1f}", f"{best['generate', b]:.1f}",
             f"{best['pool', b] / best['generate', b]:.2f}", f"{best['pool', b] / b:.1f}"] for b in counts]
    print(f"# decode step by live rows — {time.strftime('%Y-%m-%d')} — {machine()}")
    print(f"# {args.preset} fp32, pool of {args.slots} slots × {args.window}, prompts {args.prompt} tokens, "
          f"{args.new} greedy tokens, best of {args.repeats}")
    print(table(["live rows", "pool ms/step", "generate ms/step", "pool / generate", "pool ms per token"], rows))
    return rows


if __name__ == "__main__":
    main()
