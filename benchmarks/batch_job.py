"""The batch job's overhead: `m1jax batch` (`run_batch`: parsing, chat template, journal with fsync, responses,
final files) vs the bare scheduler (`Scheduler.run`) on the same requests, same engine and slots. Prints a
markdown table of output tokens/s (median wall time of interleaved runs) and the CPU time of all threads (steadier
on a shared machine), and the wall time spent outside `Scheduler.step` (the caller's host work: parsing, templates,
journal, responses); the goal is the batch job within 10% of the bare scheduler.

    python benchmarks/batch_job.py [--preset tiny] [--requests 64] [--slots 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine, table  # noqa: E402
from m1jax.demo import demo_model, demo_tokenizer  # noqa: E402
from m1jax.generation import Engine  # noqa: E402
from m1jax.serving import Scheduler  # noqa: E402
from m1jax.serving.batch import model_fingerprint, run_batch  # noqa: E402
from m1jax.serving.openai_protocol import CHAT_URL, SCHEMAS, build_request, parse_body  # noqa: E402

WORDS = "the moon attention expert cache river cloud answer model token layer prompt".split()


def workload(n: int, seed: int = 0) -> list[dict]:
    """`n` batch lines: chat prompts of 4–60 words, greedy, at most 8–64 new tokens."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60)))
        lines.append({"custom_id": f"r{i}", "method": "POST", "url": CHAT_URL,
                      "body": {"messages": [{"role": "user", "content": text}], "max_tokens": rng.randint(8, 64),
                               "temperature": 0}})
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--context-window", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    model = demo_model(args.preset)
    tok = demo_tokenizer(model.config.vocab_size)
    fingerprint = model_fingerprint(model)
    lines = workload(args.requests)
    root = Path(tempfile.mkdtemp(prefix="m1jax-batch-bench-"))
    inp = root / "input.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))

    in_step = [0.0]

    def scheduler():
        """A fresh scheduler whose `step` time is added up (the rest of a run is the caller's host overhead)."""
        sched = Scheduler(Engine(model, tok), slots=args.slots, context_window=args.context_window)
        step = sched.step

        def timed_step():
            t0 = time.perf_counter()
            try:
                return step()
            finally:
                in_step[0] += time.perf_counter() - t0

        sched.step = timed_step
        return sched

    def requests():
        """The batch job's own requests (same token ids, sampling, seeds), for the bare scheduler."""
        return [build_request(parse_body(SCHEMAS[CHAT_URL], json.dumps(x["body"])), tok,
                              context_window=args.context_window, request_id=x["custom_id"],
                              default_seed=0).request for x in lines]

    def bare():
        in_step[0] = 0.0
        t0, c0 = time.perf_counter(), time.process_time()
        outs = scheduler().run(requests())
        wall = time.perf_counter() - t0
        return sum(len(o.tokens) for o in outs), wall, time.process_time() - c0, wall - in_step[0]

    def batch():
        out = root / "out"
        shutil.rmtree(out, ignore_errors=True)
        in_step[0] = 0.0
        t0, c0 = time.perf_counter(), time.process_time()
        summary = run_batch(inp, out, scheduler(), tok, model_name=args.preset, model_fingerprint=fingerprint,
                            context_window=args.context_window, progress=False)
        wall = time.perf_counter() - t0
        return summary.generated_tokens, wall, time.process_time() - c0, wall - in_step[0]

    bare(), batch()  # compile every shape once
    results = {"bare scheduler (Scheduler.run)": [], "batch job (run_batch)": []}
    pairs = list(zip(results, (bare, batch), strict=True))
    for i in range(args.repeats):  # interleaved, alternating which goes first, so load shifts hit both alike
        for name, fn in pairs if i % 2 == 0 else pairs[::-1]:
            gc.collect()
            results[name].append(fn())
    rows = []
    bare_name = "bare scheduler (Scheduler.run)"

    def median(xs):
        return sorted(xs)[len(xs) // 2]

    stats = {name: (runs[0][0], *(median([r[i] for r in runs]) for i in (1, 2, 3)))
             for name, runs in results.items()}
    for name, (tokens, wall, cpu, host) in stats.items():
        rows.append([name, args.requests, tokens, f"{wall:.2f}", f"{tokens / wall:.1f}", f"{cpu:.2f}",
                     f"{host:.3f} ({host / wall:.1%})", f"{stats[bare_name][1] / wall:.3f}",
                     f"{stats[bare_name][2] / cpu:.3f}"])
    print(f"{machine()}; preset {args.preset}, {args.requests} requests, {args.slots} slots, "
          f"median of {args.repeats} interleaved runs (order alternating)")
    print(table(["path", "requests", "output tokens", "wall s", "tokens/s", "CPU s (all threads)",
                 "s outside Scheduler.step", "throughput vs bare (wall)", "vs bare (CPU)"], rows))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
