"""Held-out accuracy of demo-model candidates on two-digit arithmetic (train/tasks/arithmetic.py): greedy replies
to the held-out questions (never in any training data), scored by the exact answer after `</think>` and the
`<think>…</think>answer` format. Prints one table row per model.

    python benchmarks/demo_eval.py runs/demo_sft runs/demo_cispo m1jax/demo_model [--tokenizer DIR] [--n 300]
                                   [--temperature 1 --top-p 0.95]     (sampled, as `m1jax generate` does)

A MODEL is a training run (`output_dir` of `m1jax train sft|cispo`; its latest checkpoint, with `--tokenizer`)
or an HF / m1jax checkpoint directory with its own tokenizer files.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(path: str, tokenizer_dir: str | None):
    """(model, tokenizer) of a training run (latest checkpoint) or a checkpoint directory."""
    from m1jax.train.checkpointing import is_train_checkpoint_dir

    from m1jax.tokenizer import Tokenizer

    if is_train_checkpoint_dir(path):
        from m1jax.train.model_setup import build_model
        from m1jax.train.run_config import ModelSpec
        from m1jax.train.update import compute_model

        if tokenizer_dir is None:
            sys.exit(f"{path} is a training run: pass --tokenizer DIR (the run config's `tokenizer`)")
        bundle = build_model(ModelSpec(checkpoint=path), seed=0)
        return compute_model(bundle.graphdef, bundle.params, bundle.param_dtypes), Tokenizer.from_pretrained(
            tokenizer_dir)
    from m1jax.loading import from_pretrained

    return from_pretrained(path), Tokenizer.from_pretrained(tokenizer_dir or path)


def main(argv: list[str] | None = None) -> int:
    from m1jax.train.tasks import arithmetic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="training runs or checkpoint directories")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir for training runs (default: "
                        "runs/demo_data/tokenizer when it exists)")
    parser.add_argument("--n", type=int, default=300, help="held-out questions (a third per op)")
    parser.add_argument("--show", type=int, default=0, help="print this many replies per model")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    args = parser.parse_args(argv)
    tokenizer_dir = args.tokenizer or ("runs/demo_data/tokenizer" if Path("runs/demo_data/tokenizer").is_dir()
                                       else None)
    decoding = "greedy" if args.temperature == 0 else f"T={args.temperature:g}, top-p {args.top_p:g}"
    print("| model | decoding | held-out accuracy | add | sub | mul | think format | questions | eval s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in args.models:
        model, tok = load(path, tokenizer_dir)
        rows = arithmetic.held_out_rows(tok, args.n)
        t0 = time.perf_counter()
        r = arithmetic.evaluate(model, tok, rows, temperature=args.temperature, top_p=args.top_p)
        dt = time.perf_counter() - t0
        print(f"| {path} | {decoding} | {r['accuracy']:.1%} | {r['accuracy_add']:.1%} | {r['accuracy_sub']:.1%} | "
              f"{r['accuracy_mul']:.1%} | {r['format_rate']:.1%} | {len(rows)} | {dt:.0f} |", flush=True)
        for row, text in list(zip(rows, r["replies"]))[:args.show]:
            print(f"    {row['question']!r} (answer {row['answer']}) -> {text!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
