"""Serving a mixed workload on CPU: the continuous-batching `Scheduler` vs static batching of the same requests
with `Engine.generate` (same number of slots) vs transformers `generate` on the same requests in batches.

The workload (seeded): `--requests` prompts of 16–2048 tokens (log-uniform), 8–256 new tokens each (uniform),
greedy with no stop token (every request produces exactly its budget), arriving over time (Poisson, `--rate`
requests/s). Times are wall seconds from a request's arrival:

* TTFT — arrival until its first token reaches the caller (a streamed delta; the step callback for the
  engine and a streamer for transformers);
* ITL — per request, (time of its last token − time of its first) / (tokens − 1), the mean inter-token
  latency the client sees; p50 / p99 over the requests;
* throughput — all output tokens / (last token of any request − first arrival).

The last row is a bound, not a run (`ideal_bound`, costs measured in the same run on the scheduler's own calls):
the throughput if every prompt token cost what it costs in a full prefill chunk, every output token what it costs
in a full pool (`--slots` live rows: the cheapest per token, since a decode step's cost per row grows as rows go
idle), nothing waited, and every prefill chunk also carried one decode step of the pool for free (as a scheduler
that mixes decode rows into prefill chunks could). Its ratio to static batching bounds what a scheduler of
these slots and this prefill chunk could reach at this machine's costs.

Static batching takes the requests in arrival order, `--slots` at a time: a batch starts when the previous one
finished and its last request has arrived, and decodes until its longest request is done (transformers the
same, left-padded; each request counts only its own budget). Nothing is compiled while timed: the scheduler
compiles every decode burst and prefill chunk (`Scheduler.warmup`) and serves the whole workload once untimed
first, static batching runs every batch once untimed (each batch has its own shapes), transformers runs one
warm-up batch. Prints a markdown table.

    python benchmarks/serving.py [--preset bench-small] [--requests 24] [--rate 2] [--slots 8] [--seed 0]
    python benchmarks/serving.py --quick     # tiny preset, 6 short requests, no transformers: a smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import machine, table  # noqa: E402
from benchmarks.decode_rows import pool_times  # noqa: E402
from m1jax.config import ModelConfig  # noqa: E402
from m1jax.generation import Engine  # noqa: E402
from m1jax.model import MiniMaxM1  # noqa: E402
from m1jax.sampling import SamplingParams  # noqa: E402
from m1jax.serving import Request, Scheduler  # noqa: E402


@dataclasses.dataclass
class Work:
    """One request of the workload: prompt ids, new-token budget, arrival (seconds after the start)."""

    prompt: list[int]
    new: int
    arrival: float


def workload(n: int, vocab: int, rate: float, prompt_range: tuple[int, int], new_range: tuple[int, int],
             seed: int) -> list[Work]:
    """`n` requests: prompt lengths log-uniform in `prompt_range`, budgets uniform in `new_range` (inclusive),
    Poisson arrivals at `rate` per second (the first at 0)."""
    if n < 1 or rate <= 0:
        raise ValueError(f"need at least one request and a positive arrival rate, got {n} and {rate}")
    rng = np.random.default_rng(seed)
    lo, hi = prompt_range
    lengths = np.exp(rng.uniform(np.log(lo), np.log(hi + 1), n)).astype(int).clip(lo, hi)
    news = rng.integers(new_range[0], new_range[1] + 1, n)
    gaps = rng.exponential(1.0 / rate, n)
    gaps[0] = 0.0
    arrivals = np.cumsum(gaps)
    return [Work(rng.integers(0, vocab, int(t)).tolist(), int(m), float(a))
            for t, m, a in zip(lengths, news, arrivals, strict=True)]


def greedy(new: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=new, stop_token_ids=(), repetition_stop=None)


def wait_until(t0: float, at: float) -> None:
    delay = t0 + at - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def run_continuous(engine: Engine, work: list[Work], slots: int, chunk: int, decode_steps: int) -> list[list[float]]:
    """Token times (seconds after the start) of every request served by the scheduler's background thread. After
    `warmup()` the workload runs twice on the same scheduler and the second run is timed (the live rows of each
    compacted burst depend on the arrivals' timing, so the warm-up compiles every batch a burst can take)."""
    window = max(len(w.prompt) + w.new for w in work)
    scheduler = Scheduler(engine, slots=slots, context_window=window, prefill_chunk=chunk, decode_steps=decode_steps)
    scheduler.warmup()
    scheduler.start()
    try:
        for _ in range(2):
            times: list[list[float]] = [[] for _ in work]
            threads = []
            t0 = time.perf_counter()

            def watch(i, handle, t0=t0, times=times):
                for d in handle.deltas():
                    now = time.perf_counter() - t0
                    times[i].extend([now] * len(d.token_ids))

            for i, w in enumerate(work):
                wait_until(t0, w.arrival)
                h = scheduler.submit(Request(prompt=w.prompt, sampling=greedy(w.new)))
                threads.append(threading.Thread(target=watch, args=(i, h)))
                threads[-1].start()
            for t in threads:
                t.join()
    finally:
        scheduler.shutdown()
    return times


def batches(work: list[Work], slots: int) -> list[list[int]]:
    return [list(range(i, min(i + slots, len(work)))) for i in range(0, len(work), slots)]


def run_static(engine: Engine, work: list[Work], slots: int) -> list[list[float]]:
    """Token times of every request when served `slots` at a time by `Engine.generate` (streaming callback).
    Each batch's shapes (bucketed prompt width, cache length) compile on their first use, so every batch runs
    once untimed first."""
    for idx in batches(work, slots):
        engine.generate([work[i].prompt for i in idx], [greedy(work[i].new) for i in idx])
    times: list[list[float]] = [[] for _ in work]
    t0 = time.perf_counter()
    for idx in batches(work, slots):
        wait_until(t0, max(work[i].arrival for i in idx))

        def on_step(step, tokens, active, idx=idx):
            now = time.perf_counter() - t0
            for row, i in enumerate(idx):
                if active[row] and len(times[i]) < work[i].new:
                    times[i].append(now)

        engine.generate([work[i].prompt for i in idx], [greedy(work[i].new) for i in idx], callback=on_step)
    return times


def run_transformers(config: ModelConfig, work: list[Work], slots: int) -> list[list[float]]:
    """Token times of every request served `slots` at a time by transformers `generate` (left-padded batches,
    greedy, up to the batch's largest budget; a streamer timestamps each step)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    from benchmarks.common import transformers_model

    hf = transformers_model(config)
    times: list[list[float]] = [[] for _ in work]

    class Clock(BaseStreamer):
        def __init__(self, idx, t0):
            self.idx, self.t0, self.calls = idx, t0, 0

        def put(self, value):
            self.calls += 1
            if self.calls == 1:  # the prompt
                return
            now = time.perf_counter() - self.t0
            for i in self.idx:
                if len(times[i]) < work[i].new:
                    times[i].append(now)

        def end(self):
            pass

    def generate(idx, t0, cap=None):
        prompts = [work[i].prompt for i in idx]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        new = max(work[i].new for i in idx) if cap is None else cap
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                        pad_token_id=0, eos_token_id=None, streamer=Clock(idx if cap is None else [], t0))

    generate(batches(work, slots)[0], time.perf_counter(), cap=2)  # warm-up
    t0 = time.perf_counter()
    for idx in batches(work, slots):
        wait_until(t0, max(work[i].arrival for i in idx))
        generate(idx, t0)
    return times


def ideal_bound(engine: Engine, work: list[Work], slots: int, chunk: int, decode_steps: int, repeats: int = 2
                ) -> dict:
    """Seconds per prompt token of a full prefill chunk and per output token of a full pool (best of `repeats`,
    measured on the scheduler's own calls), and the throughput of `work` at those costs with no idle time, less
    one full-pool decode step per prefill chunk (see the module docstring)."""
    window = max(len(w.prompt) + w.new for w in work)
    rng = np.random.default_rng(0)
    new = 4 * decode_steps
    best_prefill, best_decode = float("inf"), float("inf")
    for _ in range(repeats + 1):  # the first round compiles
        prompts = [rng.integers(0, engine.config.vocab_size, chunk).tolist() for _ in range(slots)]
        prefill, decode = pool_times(engine, prompts, new, slots, window, prefill_chunk=chunk,
                                     decode_steps=decode_steps)
        best_prefill = min(best_prefill, prefill / (slots * chunk))
        best_decode = min(best_decode, decode / (slots * new))
    tokens = sum(w.new for w in work)
    chunks = sum(-(-len(w.prompt) // chunk) for w in work)
    span = (best_prefill * sum(len(w.prompt) for w in work) + best_decode * tokens
            - min(chunks, tokens / slots) * best_decode * slots)
    return {"name": "bound: ideal scheduler at the full-pool costs", "tokens/s": tokens / span, "span": span,
            "prefill_s_per_token": best_prefill, "decode_s_per_token": best_decode}


def summarize(name: str, work: list[Work], times: list[list[float]]) -> dict:
    for w, t in zip(work, times, strict=True):
        if len(t) != w.new:
            raise RuntimeError(f"{name}: a request got {len(t)} tokens, expected {w.new}")
    ttft = [t[0] - w.arrival for w, t in zip(work, times, strict=True)]
    itl = [(t[-1] - t[0]) / (len(t) - 1) for t in times if len(t) > 1]
    span = max(t[-1] for t in times) - min(w.arrival for w in work)
    tokens = sum(len(t) for t in times)
    return {"name": name, "tokens/s": tokens / span, "span": span, "ttft": ttft, "itl": itl}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bench-small")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--rate", type=float, default=2.0, help="arrivals per second (Poisson)")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--prompt", default="16,2048", help="prompt length range (log-uniform)")
    ap.add_argument("--new", default="8,256", help="new-token range (uniform)")
    ap.add_argument("--chunk", type=int, default=256, help="the scheduler's prefill chunk")
    ap.add_argument("--decode-steps", type=int, default=4, help="the scheduler's decode burst")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: tiny preset, 6 requests of 16-64 + 4-12 tokens, 4 slots, no transformers")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.requests, args.rate, args.slots = "tiny", 6, 50.0, 4
        args.prompt, args.new, args.chunk, args.no_transformers = "16,64", "4,12", 32, True
    config = ModelConfig.from_preset(args.preset)
    prompt_range = tuple(int(x) for x in args.prompt.split(","))
    new_range = tuple(int(x) for x in args.new.split(","))
    work = workload(args.requests, config.vocab_size, args.rate, prompt_range, new_range, args.seed)
    engine = Engine(MiniMaxM1(config, rngs=nnx.Rngs(0)))

    results = [summarize("continuous (Scheduler)", work, run_continuous(engine, work, args.slots, args.chunk,
                                                                         args.decode_steps))]
    bound = ideal_bound(engine, work, args.slots, args.chunk, args.decode_steps)  # next to the run it bounds
    results.append(summarize("static batches (Engine.generate)", work, run_static(engine, work, args.slots)))
    if not args.no_transformers:
        results.append(summarize("transformers generate (batches)", work,
                                 run_transformers(config, work, args.slots)))

    print(f"# serving benchmark — {time.strftime('%Y-%m-%d')} — {machine()}")
    print(f"# {args.preset} fp32, {args.requests} requests (prompts {args.prompt} log-uniform, new {args.new}, "
          f"greedy), Poisson arrivals {args.rate}/s over {work[-1].arrival:.1f} s, {args.slots} slots, "
          f"seed {args.seed}, {sum(w.new for w in work)} output tokens, {sum(len(w.prompt) for w in work)} "
          f"prompt tokens")
    base = results[0]["tokens/s"]
    rows = [[r["name"], f"{r['tokens/s']:.1f}", f"{base / r['tokens/s']:.2f}x", f"{r['span']:.1f}",
             f"{np.percentile(r['ttft'], 50):.2f}", f"{np.percentile(r['ttft'], 99):.2f}",
             f"{1e3 * np.percentile(r['itl'], 50):.0f}", f"{1e3 * np.percentile(r['itl'], 99):.0f}"]
            for r in results]
    rows.append([bound["name"], f"{bound['tokens/s']:.1f}", f"{base / bound['tokens/s']:.2f}x",
                 f"{bound['span']:.1f}", "", "", "", ""])
    print(table(["system", "output tokens/s", "continuous speed-up", "span (s)", "TTFT p50 (s)", "TTFT p99 (s)",
                 "ITL p50 (ms)", "ITL p99 (ms)"], rows))
    static = results[1]["tokens/s"]
    print(f"# full-pool costs: prefill {1e3 * bound['prefill_s_per_token']:.2f} ms/token (chunk {args.chunk}), "
          f"decode {1e3 * bound['decode_s_per_token']:.2f} ms/token ({args.slots} rows); ratios to static batching: "
          f"continuous {base / static:.2f}x, bound {bound['tokens/s'] / static:.2f}x")
    return results + [bound]


if __name__ == "__main__":
    main()
