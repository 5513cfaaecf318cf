"""Prefix-cache speed-up in the continuous-batching scheduler: one shared 4K-token document asked 20 questions, on
the bench config (fp32, CPU).

The 20 requests (document + own question, greedy, `--new` tokens each) are submitted at once to a
`Scheduler` driven by its background thread, once with `prefix_cache_tokens=0` and once with the cache on.
Without the cache every request prefills the whole document; with it the first request fills the cache and the
others restore the document's blocks and prefill only their question. Time to first token (TTFT) = submission
until the request's first streamed delta; total = until the last request finishes. Every shape is compiled on
another document first. Prints a markdown table.

    python benchmarks/prefix_cache.py [--preset bench-small] [--doc 4096] [--questions 20] [--question-len 32]
        [--new 16] [--slots 8] [--chunk 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import machine, table  # noqa: E402
from m1jax.config import ModelConfig  # noqa: E402
from m1jax.generation import Engine  # noqa: E402
from m1jax.model import MiniMaxM1  # noqa: E402
from m1jax.sampling import SamplingParams  # noqa: E402
from m1jax.serving import Request, Scheduler  # noqa: E402


def serve(scheduler: Scheduler, requests: list[Request]):
    """Submit all requests at once; returns (per-request TTFT seconds, total seconds, outputs)."""
    t0 = time.perf_counter()
    handles = [scheduler.submit(r) for r in requests]
    ttft = [0.0] * len(handles)

    def watch(i, handle):
        for _ in handle.deltas():
            if not ttft[i]:
                ttft[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=watch, args=(i, h)) for i, h in enumerate(handles)]
    for t in threads:
        t.start()
    outputs = [h.result() for h in handles]
    total = time.perf_counter() - t0
    for t in threads:
        t.join()
    return ttft, total, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bench-small")
    ap.add_argument("--doc", type=int, default=4096, help="document tokens")
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--question-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=16, help="tokens generated per question")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=256, help="the scheduler's prefill chunk (= cache block)")
    args = ap.parse_args()

    config = ModelConfig.from_preset(args.preset)
    engine = Engine(MiniMaxM1(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    doc, warm_doc = (rng.integers(0, config.vocab_size, args.doc).tolist() for _ in range(2))
    questions = [rng.integers(0, config.vocab_size, args.question_len).tolist() for _ in range(args.questions)]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=args.new, stop_token_ids=(), repetition_stop=None)
    window = args.doc + args.question_len + args.new
    requests = [Request(prompt=doc + q, sampling=sampling) for q in questions]
    warm = [Request(prompt=warm_doc + q, sampling=sampling) for q in questions[:2]]

    results = {}
    for name, budget in (("no cache", 0), ("prefix cache", 2 * window)):
        scheduler = Scheduler(engine, slots=args.slots, context_window=window, prefill_chunk=args.chunk,
                              decode_steps=4, prefix_cache_tokens=budget)
        scheduler.start()
        try:
            serve(scheduler, warm)  # compiles every shape this run uses (with the cache: a restore too)
            before = scheduler.stats()
            ttft, total, outputs = serve(scheduler, requests)
            after = scheduler.stats()
        finally:
            scheduler.shutdown()
        hits = (after["prefix_hits"] - before["prefix_hits"], after["prefix_lookups"] - before["prefix_lookups"])
        results[name] = (ttft, total, outputs, hits)

    base, cached = results["no cache"], results["prefix cache"]
    same_tokens = all(a.tokens == b.tokens for a, b in zip(base[2], cached[2], strict=True))
    max_dlp = max(float(np.max(np.abs(np.subtract(a.logprobs, b.logprobs))))
                  for a, b in zip(base[2], cached[2], strict=True))
    print(f"# prefix cache in the scheduler: {args.questions} questions × ({args.doc}-token document + "
          f"{args.question_len}-token question) submitted at once, {args.new} new tokens each (greedy), "
          f"{args.slots} slots, prefill chunk {args.chunk}, {args.preset} fp32")
    print(f"# {machine()}")
    rows = []
    for name, (ttft, total, outputs, (hits, lookups)) in results.items():
        rows.append([name, f"{ttft[0]:.2f}", f"{statistics.median(ttft):.2f}", f"{max(ttft):.2f}",
                     f"{statistics.median(base[0]) / statistics.median(ttft):.1f}×", f"{total:.1f}",
                     f"{base[1] / total:.1f}×", sum(o.cached_tokens for o in outputs), f"{hits}/{lookups}"])
    print(table(["mode", "TTFT 1st request (s)", "TTFT median (s)", "TTFT max (s)", "TTFT speed-up", "total (s)",
                 "total speed-up", "prompt tokens from cache", "hits/lookups"], rows))
    print(f"greedy tokens identical with and without the cache: {same_tokens}; max |Δ log-prob| {max_dlp:.1e}")


if __name__ == "__main__":
    main()
