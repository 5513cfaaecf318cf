"""Held-out accuracy of demo-model candidates on two-digit arithmetic (train/tasks/arithmetic.py): greedy replies
to the held-out questions (never in any training data), scored by the exact answer after `</think>` and the
`<think>…</think>answer` format. Prints one table row per model.

    python benchmarks/demo_eval.py runs/demo_sft runs/demo_cispo m1jax/demo_model [--tokenizer DIR] [--n 300]
                                   [--temperature 1 --top-p 0.95]     (sampled, as `m1jax generate` does)
                                   [--steps]       (then a table of where replies go wrong: the kind of the
                                                    first step that differs from the reference scratchpad)
    python benchmarks/demo_eval.py m1jax/demo_model --question "What is 17 * 23?" --expect 391 --seeds 20 \
                                   --temperature 1 --top-p 0.95   (one question, sampled with seeds 0..19 as
                                                                   `m1jax generate --chat --seed S` does)

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
    """(model, tokenizer) of a training run (latest checkpoint, tokenizer `tokenizer_dir`) or a checkpoint
    directory (its own tokenizer files)."""
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

    return from_pretrained(path), Tokenizer.from_pretrained(path)


def main(argv: list[str] | None = None) -> int:
    from m1jax.train.tasks import arithmetic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="training runs or checkpoint directories")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir for training runs (default: "
                        "runs/demo_data/tokenizer when it exists); a checkpoint directory uses its own")
    parser.add_argument("--n", type=int, default=300, help="held-out questions (a third per op)")
    parser.add_argument("--show", type=int, default=0, help="print this many replies per model")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--steps", action="store_true", help="also tabulate the first wrong scratchpad step")
    parser.add_argument("--question", help="instead of the held-out set: this one question, once per seed")
    parser.add_argument("--expect", type=int, help="with --question: the right answer (counts the right replies)")
    parser.add_argument("--seeds", type=int, default=20, help="with --question: seeds 0..SEEDS-1")
    args = parser.parse_args(argv)
    if args.question is not None and args.expect is None:
        parser.error("--question needs --expect (the right answer)")
    tokenizer_dir = args.tokenizer or ("runs/demo_data/tokenizer" if Path("runs/demo_data/tokenizer").is_dir()
                                       else None)
    decoding = "greedy" if args.temperature == 0 else f"T={args.temperature:g}, top-p {args.top_p:g}"
    print("| model | decoding | held-out accuracy | add | sub | mul | think format | questions | eval s |")
    print("|---|---|---|---|---|---|---|---|---|")
    breakdowns = {}
    if args.question is not None:
        for path in args.models:
            model, tok = load(path, tokenizer_dir)
            ask_with_seeds(model, tok, path, args.question, args.expect, args.seeds, args.temperature, args.top_p)
        return 0
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
        breakdowns[path] = step_breakdown(rows, r["replies"])
    if args.steps:
        print_breakdowns(breakdowns)
    return 0


def ask_with_seeds(model, tok, path: str, question: str, expect: int, seeds: int, temperature: float,
                   top_p: float) -> int:
    """Replies to `question` (one chat turn) with seeds 0..seeds-1, each generated alone with the sampling
    `m1jax generate --chat --seed S` uses (256 new tokens at most); prints each answer line and returns how many
    are right (`arithmetic.score_reply`)."""
    from m1jax.train.tasks import arithmetic

    from m1jax.generation import Engine
    from m1jax.sampling import SamplingParams

    engine = Engine(model, tok)
    ids = tok.encode(arithmetic.chat_prompt(tok, question))
    right = 0
    print(f"| {path}: seed | answer after </think> | right |\n|---|---|---|")
    for seed in range(seeds):
        [res] = engine.generate([ids], SamplingParams(temperature=temperature, top_p=top_p, seed=seed,
                                                      max_new_tokens=256))
        text = tok.decode(res.tokens, skip_special_tokens=True)
        ok = arithmetic.score_reply(text, expect)["correct"]
        right += ok
        print(f"| {seed} | {text.partition('</think>')[2].strip()!r} | {'yes' if ok else 'no'} |", flush=True)
    print(f"{path}: {question!r} right in {right} of {seeds} seeds (T={temperature:g}, top-p {top_p:g})")
    return right


def step_breakdown(rows: list[dict], replies: list[str]) -> dict[tuple[str, str, bool], int]:
    """{(op, first wrong step kind or "reference", answer correct): count} over the replies
    (`arithmetic.first_wrong_step`)."""
    from collections import Counter

    from m1jax.train.tasks import arithmetic

    return dict(Counter((row["op"], arithmetic.first_wrong_step(row["op"], row["a"], row["b"], text) or "reference",
                         arithmetic.score_reply(text, row["answer"])["correct"]) for row, text in zip(rows, replies)))


def print_breakdowns(breakdowns: dict[str, dict]) -> None:
    """One table per op: replies per first wrong step kind (and how many of them still got the answer right)."""
    for op in ("add", "sub", "mul"):
        kinds = sorted({k for b in breakdowns.values() for (o, k, _) in b if o == op})
        print(f"\n{op}: replies by first step that differs from the reference scratchpad (right answers among them)")
        print("| model | " + " | ".join(kinds) + " |")
        print("|---|" + "---|" * len(kinds))
        for path, b in breakdowns.items():
            cells = [f"{b.get((op, k, True), 0) + b.get((op, k, False), 0)} ({b.get((op, k, True), 0)})" for k in kinds]
            print(f"| {path} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
