"""Prefix-cache speed-up: one shared 4K-token document asked 20 questions, on the bench config (fp32, CPU).

Each request is the document followed by its own question; every request is prefilled block-aligned
(`m1jax.prefix_cache.RowPrefill`, block = the prefill chunk) and then decodes `--new` greedy tokens. Without the
cache every request prefills the whole document; with it the first request fills the cache and the other 19
restore the document's blocks and prefill only their question. Time to first token = request start until the
next-token logits are ready (the first token is their argmax); total = all 20 requests. Prints a markdown table.

    python benchmarks/prefix_cache.py [--preset bench-small] [--doc 4096] [--questions 20] [--question-len 32]
        [--new 16] [--block 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import machine, table  # noqa: E402
from m1jax.config import ModelConfig  # noqa: E402
from m1jax.generation import Engine  # noqa: E402
from m1jax.model import MiniMaxM1  # noqa: E402
from m1jax.prefix_cache import PrefixCache, prefill_prompt  # noqa: E402
from m1jax.sampling import SamplingParams  # noqa: E402


def serve(engine, prompts, sampling, *, block, capacity, store):
    """Run the requests one after another; per request (time to first token, total time), the outputs and the
    tokens restored from the cache."""
    times, outputs, cached = [], [], 0
    for prompt in prompts:
        t0 = time.perf_counter()
        state, hit = prefill_prompt(engine, prompt, block=block, capacity=capacity, store=store)
        jax.block_until_ready(state.next_logits_BxV)
        ttft = time.perf_counter() - t0
        [result], _ = engine.decode(state, sampling, consume_state=True)
        times.append((ttft, time.perf_counter() - t0))
        outputs.append(result)
        cached += hit
    return times, outputs, cached


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bench-small")
    ap.add_argument("--doc", type=int, default=4096, help="document tokens")
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--question-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=16, help="tokens generated per question")
    ap.add_argument("--block", type=int, default=256, help="prefill chunk = cache block")
    args = ap.parse_args()

    config = ModelConfig.from_preset(args.preset)
    engine = Engine(MiniMaxM1(config, rngs=nnx.Rngs(0)), prefill_chunk=args.block)
    rng = np.random.default_rng(0)
    doc, warm_doc = (rng.integers(0, config.vocab_size, args.doc).tolist() for _ in range(2))
    questions = [rng.integers(0, config.vocab_size, args.question_len).tolist() for _ in range(args.questions)]
    capacity = -(-(args.doc + args.question_len + args.block) // args.block) * args.block
    sampling = SamplingParams(temperature=0.0, max_new_tokens=args.new, stop_token_ids=(), repetition_stop=None)
    budget = capacity  # the document's blocks fit
    # Compile every shape both runs use (full blocks, the question tail, restores, decode) on another document.
    warm = PrefixCache(args.block, budget)
    serve(engine, [warm_doc + q for q in questions[:2]], sampling, block=args.block, capacity=capacity, store=warm)

    prompts = [doc + q for q in questions]
    results = {}
    for name, store in (("no cache", None), ("prefix cache", PrefixCache(args.block, budget))):
        t0 = time.perf_counter()
        times, outputs, cached = serve(engine, prompts, sampling, block=args.block, capacity=capacity, store=store)
        results[name] = (times, outputs, cached, time.perf_counter() - t0, store)
    base_out, cache_out = results["no cache"][1], results["prefix cache"][1]
    same = all(a.tokens == b.tokens and a.logprobs == b.logprobs for a, b in zip(base_out, cache_out, strict=True))

    print(f"# prefix cache: {args.questions} questions × ({args.doc}-token document + {args.question_len}-token "
          f"question), {args.new} new tokens each, block {args.block}, {args.preset} fp32")
    print(f"# {machine()}")
    rows = []
    base_total = results["no cache"][3]
    base_ttft = statistics.median(t for t, _ in results["no cache"][0][1:])
    for name, (times, _, cached, total, store) in results.items():
        ttft_first = times[0][0]
        ttft_rest = statistics.median(t for t, _ in times[1:])
        hits = f"{store.hits}/{store.lookups}" if store is not None else "-"
        rows.append([name, f"{ttft_first:.2f}", f"{ttft_rest:.3f}", f"{base_ttft / ttft_rest:.1f}×",
                     f"{total:.1f}", f"{base_total / total:.1f}×", cached, hits])
    print(table(["mode", "TTFT 1st request (s)", "TTFT median, requests 2–N (s)", "TTFT speed-up", "total (s)",
                 "total speed-up", "prompt tokens from cache", "hits/lookups"], rows))
    print(f"greedy tokens and log-probs identical with and without the cache: {same}")


if __name__ == "__main__":
    main()
