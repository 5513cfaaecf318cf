"""Time to first token of a long-document request with the scheduler's state directory (`Scheduler(state_dir=...)`,
`m1jax serve --state-dir`), on the bench config (fp32, CPU).

One request (a `--doc`-token document + a 32-token question, greedy, `--new` tokens) through a fresh `Scheduler`
per row, driven by its background thread (as in `m1jax serve`):

* fresh, no state dir — the plain block-aligned prefill (prefix cache on, empty);
* fresh, checkpointing — the same with `state_dir`, writing a checkpoint every `--every` tokens;
* killed at half, resumed — a new scheduler (a restarted server) on a directory holding only the checkpoint at
  half the document (what a kill in the middle of the prefill leaves);
* restart, resumed from disk — a new scheduler on the directory of the fresh run (the deepest checkpoint);
* in-memory prefix hit — the same scheduler as the first row, asked again (the memory tier).

Every shape is compiled on another document first. Prints a markdown table; the outputs of all rows are compared
(greedy tokens and log-probs must be identical).

    python benchmarks/state_resume.py [--preset bench-small] [--doc 8192] [--chunk 256] [--every 1024] [--new 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import machine, table  # noqa: E402
from benchmarks.prefix_cache import serve  # noqa: E402
from m1jax.config import ModelConfig  # noqa: E402
from m1jax.generation import Engine  # noqa: E402
from m1jax.model import MiniMaxM1  # noqa: E402
from m1jax.sampling import SamplingParams  # noqa: E402
from m1jax.serving import Request, Scheduler  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bench-small")
    ap.add_argument("--doc", type=int, default=8192, help="document tokens")
    ap.add_argument("--chunk", type=int, default=256, help="the scheduler's prefill chunk (= block)")
    ap.add_argument("--every", type=int, default=1024, help="tokens between checkpoints")
    ap.add_argument("--new", type=int, default=8, help="tokens generated")
    args = ap.parse_args()

    config = ModelConfig.from_preset(args.preset)
    engine = Engine(MiniMaxM1(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    doc, warm_doc = (rng.integers(0, config.vocab_size, args.doc).tolist() for _ in range(2))
    question = rng.integers(0, config.vocab_size, 32).tolist()
    sampling = SamplingParams(temperature=0.0, max_new_tokens=args.new, stop_token_ids=(), repetition_stop=None)
    window = args.doc + 32 + args.new
    root = tempfile.mkdtemp(prefix="m1jax-state-bench-")
    pool = dict(slots=2, context_window=window, prefill_chunk=args.chunk, decode_steps=4,
                prefix_cache_tokens=2 * window)

    def scheduler(state_dir=None) -> Scheduler:
        extra = {} if state_dir is None else dict(state_dir=os.path.join(root, state_dir), checkpoint_every=args.every)
        s = Scheduler(engine, **pool, **extra)
        s.start()
        return s

    def ask(s: Scheduler, prompt) -> tuple[float, object]:
        [ttft], _, [out] = serve(s, [Request(prompt=prompt, sampling=sampling)])
        return ttft, out

    warm = scheduler("warm")  # every shape: prefill, checkpoint, restore, decode
    ask(warm, warm_doc + question)
    ask(warm, warm_doc + question)
    warm.shutdown()
    restart = scheduler("warm")
    ask(restart, warm_doc + question)
    restart.shutdown()

    results = []  # (mode, TTFT, output)
    plain = scheduler()
    results.append(("fresh, no state dir", *ask(plain, doc + question)))
    in_memory = ask(plain, doc + question)
    plain.shutdown()

    t0 = time.perf_counter()
    fresh = scheduler("run")
    results.append((f"fresh, checkpointing every {args.every}", *ask(fresh, doc + question)))
    fresh.shutdown()  # waits for the checkpoint writes
    written, flushed = fresh.stats()["state_written"], time.perf_counter() - t0

    half = (args.doc // 2) // args.every * args.every
    killed = scheduler("half")  # a directory whose deepest checkpoint of the document is at `half`
    ask(killed, doc[:half])
    killed.shutdown()
    resumed_half = scheduler("half")
    results.append((f"killed at {half}, resumed", *ask(resumed_half, doc + question)))
    resumed_half.shutdown()

    restarted = scheduler("run")
    results.append(("restart, resumed from disk", *ask(restarted, doc + question)))
    restarted.shutdown()
    results.append(("in-memory prefix hit", *in_memory))

    base = results[0][1]
    rows = [[mode, f"{ttft:.2f}", out.cached_tokens, f"{base / ttft:.1f}×"] for mode, ttft, out in results]
    outs = [out for _, _, out in results]
    same = all(o.tokens == outs[0].tokens and o.logprobs == outs[0].logprobs for o in outs)
    print(f"# state directory: time to first token of one request ({args.doc}-token document + 32-token question, "
          f"{args.new} greedy tokens), prefill chunk {args.chunk}, checkpoint every {args.every}, {args.preset} "
          f"fp32")
    print(f"# {machine()}")
    print(table(["mode", "TTFT (s)", "prompt tokens restored", "TTFT speed-up"], rows))
    print(f"checkpoints written by the fresh run: {written} ({flushed:.1f} s until all were on disk); "
          f"greedy tokens and log-probs identical in every row: {same}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
