"""Two-digit arithmetic in plain English with verifiable answers: the task the embedded demo model is trained on.

A problem is (op, a, b) with op in `OPS` ("add", "sub", "mul") and a, b in 10..99, asked in one of several
English phrasings (`PHRASINGS`). The reference reply, in M1's format, is a worked scratchpad in a think block
followed by the answer; every computing step is a one-digit fact with its carry or borrow written out
(`scratchpad_steps`), the partial results are put together by copying digits:

    What is 17 * 23?  ->  <think>
                          7*3=21             units of 17 times 3: write 1, carry 2
                          1*3+2=5            17*3 = 51
                          7*2=14
                          1*2+1=3            17*2 = 34
                          17*23=0051+0340    the partial products in 4 digits
                          1+0=1              column addition from the units
                          5+4=9
                          0+3=3
                          0+0=0
                          </think>
                          17 * 23 = 391

    47 + 38  ->  7+8=15 / 4+3+1=8 (= 85)        83 - 47  ->  83>47 / 13-7=6 / 8-1-4=3 (= 36)
    23 - 57  ->  23<57 / 7-3=4 / 5-2=3 (57 - 23 = 34, so -34)

Why: the first shipped demo model, whose scratchpad added multi-digit numbers in one step (`340+51=391`), got 32%
of held-out products right; 55 of its 68 wrong products first went wrong in that final addition and
the other 13 in a partial-product sum (`280+63=343`), none in a one-digit product or a copy; 12 of its 17 wrong
differences first went wrong combining tens and units across a borrow (`10-7=3`) (benchmarks/RESULTS.md, "Demo
model").

Prompts and replies are rendered with a tokenizer's chat template (the demo tokenizer's M1-format template), so the
reply text is exactly what follows `<beginning_of_sentence>ai name=assistant\\n`.

The held-out split: (op, a, b) with `is_held_out` (a fixed hash, about 1 in 10 of every op's 8100 pairs) is never
in training data. `write_dataset` writes the demo recipe's files (see configs/train/demo_sft.yaml):

    python -m m1jax.train.tasks.arithmetic --out runs/demo_data
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
from collections.abc import Iterable

import numpy as np

OPS = ("add", "sub", "mul")
SYMBOLS = {"add": "+", "sub": "-", "mul": "*"}
MIN_OPERAND, MAX_OPERAND = 10, 99
HELD_OUT_MODULUS = 10  # 1 in HELD_OUT_MODULUS pairs is held out
MUL_WIDTH = 4  # digits of a product of two operands (99 * 99 < 10**4)

PHRASINGS = {
    "add": ("What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.",
            "What's the sum of {a} and {b}?", "Calculate {a} plus {b}.", "{a} + {b} = ?", "How much is {a} plus {b}?",
            "What do you get if you add {a} to {b}?", "Please add {a} and {b}."),
    "sub": ("What is {a} - {b}?", "What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}.",
            "What's {a} take away {b}?", "Calculate {a} minus {b}.", "{a} - {b} = ?", "How much is {a} minus {b}?",
            "What do you get if you subtract {b} from {a}?", "Take {b} away from {a}."),
    "mul": ("What is {a} * {b}?", "What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} x {b}.",
            "What's the product of {a} and {b}?", "Calculate {a} times {b}.", "{a} * {b} = ?",
            "How much is {a} times {b}?", "What is {a} multiplied by {b}?", "What is {a} × {b}?"),
}


def _check(op: str, a: int, b: int) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    for name, v in (("a", a), ("b", b)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not MIN_OPERAND <= v <= MAX_OPERAND:
            raise ValueError(f"operand {name} must be an integer in {MIN_OPERAND}..{MAX_OPERAND}, got {v!r}")


def answer(op: str, a: int, b: int) -> int:
    """The exact result of `a op b`."""
    _check(op, a, b)
    return {"add": a + b, "sub": a - b, "mul": a * b}[op]


def _digits(x: int, width: int) -> list[int]:
    """The `width` lowest decimal digits of x >= 0, units first."""
    return [(x // 10 ** i) % 10 for i in range(width)]


def _column_add(x: int, y: int, width: int | None = None) -> list[tuple[str, str]]:
    """Steps of x + y (x, y >= 0) over `width` columns (default: the longer number's digits) from the units:
    `xi+yi=s` or `xi+yi+1=s` after a carry, the digits of x and y at that column (0 past a number's end). The sum
    is the last step's result followed by the units digits of the earlier steps, last to first (leading zeros
    dropped)."""
    width = width or max(len(str(x)), len(str(y)))
    steps, carry = [], 0
    for xi, yi in zip(_digits(x, width), _digits(y, width)):
        total = xi + yi + carry
        steps.append(("column add", f"{xi}+{yi}{'+1' if carry else ''}={total}"))
        carry = total // 10
    return steps


def _column_sub(x: int, y: int) -> list[tuple[str, str]]:
    """Steps of x - y (x >= y >= 0) column by column from the units: `xi-yi=d`, with a borrow from the next column
    `1xi-yi=d` (xi + 10), and after a borrow `xi-1-yi=d`. The difference is the steps' results last to first,
    leading zeros dropped."""
    width = len(str(x))
    steps, borrow = [], 0
    for xi, yi in zip(_digits(x, width), _digits(y, width)):
        take = xi - borrow - yi
        borrow_next = int(take < 0)
        steps.append(("column sub", f"{xi + 10 * borrow_next}{'-1' if borrow else ''}-{yi}={take + 10 * borrow_next}"))
        borrow = borrow_next
    return steps


def _digit_times(a: int, d: int) -> list[tuple[str, str]]:
    """Steps of a * d (two-digit a, one digit d): `q*d=u` (units digit q of a), then `p*d+c=t` with c the tens
    digit of u (the carry). The product is t followed by the units digit of u."""
    p, q = divmod(a, 10)
    u = q * d
    return [("digit product", f"{q}*{d}={u}"), ("digit product", f"{p}*{d}+{u // 10}={p * d + u // 10}")]


def scratchpad_steps(op: str, a: int, b: int) -> list[tuple[str, str]]:
    """The worked steps of `a op b` as (kind, line), every computing step a one-digit fact with explicit carries:

    - add: `_column_add(a, b)`;
    - sub: the comparison `a>b`, `a<b` or `a=b`, then `_column_sub` of the larger minus the smaller (the answer
      is negative when a < b);
    - mul (b = 10r + s): `_digit_times(a, s)`, `_digit_times(a, r)`, the decomposition `a*b=a*s+a*r*10` with both
      partial products written out in `MUL_WIDTH` digits (leading zeros, so that every column sits at a fixed
      place in the line), then `_column_add` of them over `MUL_WIDTH` columns.
    """
    _check(op, a, b)
    if op == "add":
        return _column_add(a, b)
    if op == "sub":
        relation = ">" if a > b else "<" if a < b else "="
        return [("compare", f"{a}{relation}{b}")] + _column_sub(max(a, b), min(a, b))
    r, s = divmod(b, 10)
    x, y = a * s, a * r * 10
    decomposition = ("partial products", f"{a}*{b}={x:0{MUL_WIDTH}d}+{y:0{MUL_WIDTH}d}")
    return _digit_times(a, s) + _digit_times(a, r) + [decomposition] + _column_add(x, y, MUL_WIDTH)


def scratchpad(op: str, a: int, b: int) -> str:
    """The worked steps of `a op b` (`scratchpad_steps`), one per line."""
    return "\n".join(line for _, line in scratchpad_steps(op, a, b))


def first_wrong_step(op: str, a: int, b: int, text: str) -> str | None:
    """The kind of the first step of a reply `text` (`<think>\nsteps\n</think>\nanswer`) that differs from
    `scratchpad_steps(op, a, b)` ("missing step" when it stopped early, "extra step" when it wrote more, "answer"
    when every step is right but the answer after `</think>` is wrong), or None when the reply is the reference."""
    steps = scratchpad_steps(op, a, b)
    think, _, tail = text.partition("\n</think>\n")
    got = think.removeprefix("<think>\n").split("\n")
    for i, (kind, line) in enumerate(steps):
        if i >= len(got):
            return "missing step"
        if got[i] != line:
            return kind
    if len(got) > len(steps):
        return "extra step"
    return None if tail.strip() == f"{a} {SYMBOLS[op]} {b} = {answer(op, a, b)}" else "answer"


def reply(op: str, a: int, b: int) -> str:
    """The reference assistant reply: `<think>\\n{scratchpad}\\n</think>\\n{a} {sym} {b} = {answer}`."""
    return f"<think>\n{scratchpad(op, a, b)}\n</think>\n{a} {SYMBOLS[op]} {b} = {answer(op, a, b)}"


def question(op: str, a: int, b: int, phrasing: int = 0) -> str:
    """The question in English phrasing number `phrasing` of `PHRASINGS[op]`."""
    _check(op, a, b)
    templates = PHRASINGS[op]
    if not 0 <= phrasing < len(templates):
        raise ValueError(f"phrasing must be in 0..{len(templates) - 1} for op {op!r}, got {phrasing}")
    return templates[phrasing].format(a=a, b=b)


def is_held_out(op: str, a: int, b: int) -> bool:
    """Whether (op, a, b) belongs to the held-out split (a fixed hash; about 1 in 10 pairs of each op)."""
    _check(op, a, b)
    digest = hashlib.sha256(f"{op}:{a}:{b}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % HELD_OUT_MODULUS == 0


def problems(split: str) -> list[tuple[str, int, int]]:
    """Every (op, a, b) of `split` ("train" or "held_out"), in a fixed order."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    want = split == "held_out"
    rng = range(MIN_OPERAND, MAX_OPERAND + 1)
    return [(op, a, b) for op in OPS for a in rng for b in rng if is_held_out(op, a, b) == want]


def sample_problems(rng: np.random.Generator, n: int, split: str = "train",
                    ops: Iterable[str] = OPS) -> list[tuple[str, int, int, int]]:
    """n problems (op, a, b, phrasing) drawn uniformly from the problems of `split` whose op is in `ops` (ops
    balanced in expectation)."""
    ops = tuple(ops)
    if not ops or any(op not in OPS for op in ops):
        raise ValueError(f"ops must be a non-empty subset of {OPS}, got {ops}")
    pool = [p for p in problems(split) if p[0] in ops]
    picks = rng.integers(0, len(pool), size=n)
    phrasings = rng.integers(0, len(PHRASINGS["add"]), size=n)
    return [(*pool[i], int(k) % len(PHRASINGS[pool[i][0]])) for i, k in zip(picks, phrasings)]


def chat_prompt(tokenizer, text: str) -> str:
    """The chat-template rendering of one user turn plus the assistant header (what the model continues)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


def chat_example(tokenizer, op: str, a: int, b: int, phrasing: int = 0) -> dict:
    """{"prompt", "completion", "answer", "op", "a", "b"}: the rendered prompt and the rest of the rendered
    two-turn conversation (the reply, up to and including its closing `<end_of_sentence>`), and the exact answer."""
    q = question(op, a, b, phrasing)
    prompt = chat_prompt(tokenizer, q)
    full = tokenizer.apply_chat_template([{"role": "user", "content": q},
                                          {"role": "assistant", "content": reply(op, a, b)}],
                                         add_generation_prompt=False).rstrip("\n")
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the conversation as prompt + reply")
    return {"prompt": prompt, "completion": full[len(prompt):], "answer": answer(op, a, b), "op": op, "a": a,
            "b": b}


def tokenizer_corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Questions and replies of the task (every phrasing) and the chat template's role headers, to train the demo
    tokenizer's merges on."""
    rng = np.random.default_rng(seed)
    out = []
    for op, a, b, k in sample_problems(rng, n):
        out += [question(op, a, b, k), reply(op, a, b)]
    headers = ["user name=user\n", "ai name=assistant\n", "<think>\n", "\n</think>\n"] * (n // 10)
    return out + headers + [t.format(a=12, b=34) for op in OPS for t in PHRASINGS[op]]


def write_jsonl(path: pathlib.Path, rows: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_dataset(out: str | pathlib.Path, *, sft_examples: int = 40000, rl_prompts: int = 4000,
                  rl_ops: Iterable[str] = ("sub", "mul"),
                  held_out: int = 300, seed: int = 0) -> dict[str, int]:
    """The demo recipe's files under `out`: `tokenizer/` (the demo tokenizer, digits split), `sft.jsonl`
    (prompt/completion, every op), `rl.jsonl` (prompt/answer, train split, ops `rl_ops`: by default the two the
    SFT model gets wrong most, so that fewer CISPO groups are all right and carry no signal), `held_out.jsonl`
    (prompt/answer, balanced over ops, the held-out split). Returns the row count of each file."""
    from m1jax.demo import DEMO_VOCAB_SIZE, make_bpe_tokenizer_dir
    from m1jax.tokenizer import Tokenizer

    out = pathlib.Path(out)
    make_bpe_tokenizer_dir(out / "tokenizer", DEMO_VOCAB_SIZE, extra_corpus=tokenizer_corpus(), split_digits=True)
    tok = Tokenizer.from_pretrained(out / "tokenizer")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 13]))
    counts = {}
    sft = (chat_example(tok, *p) for p in sample_problems(rng, sft_examples))
    counts["sft.jsonl"] = write_jsonl(out / "sft.jsonl", ({"prompt": e["prompt"], "completion": e["completion"]}
                                                          for e in sft))
    rl = (chat_example(tok, *p) for p in sample_problems(rng, rl_prompts, ops=rl_ops))
    counts["rl.jsonl"] = write_jsonl(out / "rl.jsonl", ({"prompt": e["prompt"], "answer": e["answer"]} for e in rl))
    counts["held_out.jsonl"] = write_jsonl(out / "held_out.jsonl", held_out_rows(tok, held_out, seed=seed))
    return counts


def held_out_rows(tokenizer, n: int, seed: int = 0) -> list[dict]:
    """n held-out problems (n/3 per op, fixed by `seed`) as {"prompt", "answer", "op", "a", "b", "question"}."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 31]))
    rows = []
    for j, op in enumerate(OPS):
        pool = [p for p in problems("held_out") if p[0] == op]
        k = n // len(OPS) + (j < n % len(OPS))
        for i in rng.choice(len(pool), size=k, replace=False):
            _, a, b = pool[i]
            phrasing = int(rng.integers(len(PHRASINGS[op])))
            q = question(op, a, b, phrasing)
            rows.append({"prompt": chat_prompt(tokenizer, q), "answer": answer(op, a, b), "op": op, "a": a, "b": b,
                         "question": q})
    return rows


def score_reply(text: str, expected: int) -> dict[str, bool]:
    """{"correct": the reply's answer (after `</think>`) equals `expected` (`math_answer_reward`), "format": it is
    `<think>…</think>answer` (`think_format_reward`)}."""
    from m1jax.train.rewards import math_answer_reward, think_format_reward

    return {"correct": math_answer_reward("", text, answer=expected) == 1.0,
            "format": think_format_reward("", text) == 1.0}


def evaluate(model, tokenizer, rows: list[dict], *, max_new_tokens: int = 160, batch_size: int = 100,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> dict:
    """Replies to `rows` ({"prompt", "answer", "op"}, e.g. `held_out_rows`) and their scores:
    {"accuracy", "format_rate", "accuracy_<op>" per op present, "replies": the texts}. Greedy by default; with
    `temperature` > 0, row i samples with seed `seed + i`."""
    from m1jax.generation import Engine
    from m1jax.sampling import SamplingParams

    engine = Engine(model, tokenizer)
    replies = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        sampling = [SamplingParams(temperature=temperature, top_p=top_p, seed=seed + i + j,
                                   max_new_tokens=max_new_tokens) for j in range(len(chunk))]
        results = engine.generate([tokenizer.encode(r["prompt"]) for r in chunk], sampling)
        replies += [tokenizer.decode(res.tokens, skip_special_tokens=True) for res in results]
    scores = [score_reply(text, row["answer"]) for text, row in zip(replies, rows)]
    out = {"accuracy": float(np.mean([s["correct"] for s in scores])),
           "format_rate": float(np.mean([s["format"] for s in scores]))}
    for op in OPS:
        hits = [s["correct"] for s, row in zip(scores, rows) if row.get("op") == op]
        if hits:
            out[f"accuracy_{op}"] = float(np.mean(hits))
    out["replies"] = replies
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write the demo model's training and held-out data")
    parser.add_argument("--out", default="runs/demo_data", help="output directory")
    parser.add_argument("--sft-examples", type=int, default=40000)
    parser.add_argument("--rl-prompts", type=int, default=4000)
    parser.add_argument("--rl-ops", default="sub,mul", help="comma-separated ops of the RL prompts (the SFT "
                        "data has every op)")
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = write_dataset(args.out, sft_examples=args.sft_examples, rl_prompts=args.rl_prompts,
                           rl_ops=tuple(args.rl_ops.split(",")),
                           held_out=args.held_out, seed=args.seed)
    for name, count in counts.items():
        print(f"{args.out}/{name}: {count} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
