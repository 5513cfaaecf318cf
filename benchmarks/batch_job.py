"""The batch job's overhead: `m1jax batch` (`run_batch`: parsing, chat template, journal with fsync, responses,
final files) vs the bare scheduler (`Scheduler.run`) on the same requests, same engine and slots. Prints a
markdown table of output tokens/s; the goal is the batch job within 10% of the bare scheduler.

    python benchmarks/batch_job.py [--preset tiny] [--requests 64] [--slots 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    model = demo_model(args.preset)
    tok = demo_tokenizer(model.config.vocab_size)
    fingerprint = model_fingerprint(model)
    lines = workload(args.requests)
    root = Path(tempfile.mkdtemp(prefix="m1jax-batch-bench-"))
    inp = root / "input.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))

    def scheduler():
        return Scheduler(Engine(model, tok), slots=args.slots, context_window=args.context_window)

    def requests():
        """The batch job's own requests (same token ids, sampling, seeds), for the bare scheduler."""
        return [build_request(parse_body(SCHEMAS[CHAT_URL], json.dumps(x["body"])), tok,
                              context_window=args.context_window, request_id=x["custom_id"],
                              default_seed=0).request for x in lines]

    def bare():
        t0 = time.perf_counter()
        outs = scheduler().run(requests())
        return sum(len(o.tokens) for o in outs), time.perf_counter() - t0

    def batch():
        out = root / "out"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        summary = run_batch(inp, out, scheduler(), tok, model_name=args.preset, model_fingerprint=fingerprint,
                            context_window=args.context_window, progress=False)
        return summary.generated_tokens, time.perf_counter() - t0

    bare(), batch()  # compile every shape once
    results = {"bare scheduler (Scheduler.run)": [], "batch job (run_batch)": []}
    for _ in range(args.repeats):  # interleaved, so machine load shifts hit both alike
        for name, fn in zip(results, (bare, batch), strict=True):
            results[name].append(fn())
    rows = []
    best = {name: max(tokens / seconds for tokens, seconds in runs) for name, runs in results.items()}
    for name, runs in results.items():
        tokens, _ = runs[0]
        secs = sorted(s for _, s in runs)
        rows.append([name, args.requests, tokens, f"{secs[len(secs) // 2]:.2f}", f"{best[name]:.1f}",
                     f"{best[name] / best['bare scheduler (Scheduler.run)']:.3f}"])
    print(f"{machine()}; preset {args.preset}, {args.requests} requests, {args.slots} slots, "
          f"best of {args.repeats}")
    print(table(["path", "requests", "output tokens", "median s", "tokens/s (best)", "vs bare"], rows))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
