"""The demo model's task (train/tasks/arithmetic.py): exact answers, scratchpads whose every step is true
arithmetic, disjoint splits, M1-format chat examples, the reward, the digit-splitting tokenizer and the data files."""

import json
import re

import numpy as np
import pytest
from m1jax.train.tasks import arithmetic as ar

from m1jax.demo import DEMO_VOCAB_SIZE, make_bpe_tokenizer_dir
from m1jax.tokenizer import Tokenizer

ALL = [(op, a, b) for op in ar.OPS for a in range(10, 100) for b in range(10, 100)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = make_bpe_tokenizer_dir(tmp_path_factory.mktemp("tok"), DEMO_VOCAB_SIZE, extra_corpus=ar.tokenizer_corpus(300),
                               split_digits=True)
    return Tokenizer.from_pretrained(d)


def test_answers_are_exact():
    assert ar.answer("add", 47, 38) == 85 and ar.answer("sub", 23, 57) == -34 and ar.answer("mul", 17, 23) == 391
    assert ar.reply("mul", 17, 23) == ("<think>\n7*3=21\n1*3+2=5\n7*2=14\n1*2+1=3\n17*23=0051+0340\n1+0=1\n5+4=9\n"
                                       "0+3=3\n0+0=0\n</think>\n17 * 23 = 391")
    assert ar.scratchpad("sub", 23, 57) == "23<57\n7-3=4\n5-2=3"
    assert ar.scratchpad("sub", 51, 48) == "51>48\n11-8=3\n5-1-4=0"
    assert ar.scratchpad("sub", 47, 47) == "47=47\n7-7=0\n4-4=0"
    assert ar.scratchpad("add", 99, 99) == "9+9=18\n9+9+1=19"
    assert ar.scratchpad("mul", 81, 79).split("\n")[4:] == ["81*79=0729+5670", "9+0=9", "2+7=9", "7+6=13", "0+5+1=6"]


def _value(side: str) -> int:
    return eval(re.sub(r"\b0+(\d)", r"\1", side))  # noqa: S307 - digits and + - * only (checked by the caller)


def _assemble(results: list[str]) -> int:
    """A column method's result: the last column's result, then the earlier columns' units digits last to first."""
    return int(results[-1] + "".join(r[-1] for r in reversed(results[:-1])))


def test_every_scratchpad_step_is_true_and_a_one_digit_fact():
    """All 3 × 8100 problems: every line is a true statement (each side of `e1=e2`, a comparison `a<b`), every
    computing step has one-digit operands (plus a carry or borrow), and the column results assemble the answer."""
    for op, a, b in ALL:
        steps = ar.scratchpad_steps(op, a, b)
        for kind, line in steps:
            assert re.fullmatch(r"[-+*=<>0-9]+", line), line
            if kind == "compare":
                assert eval(line if "=" not in line else line.replace("=", "==")), line  # noqa: S307
                continue
            sides = [_value(side) for side in line.split("=")]
            assert len(set(sides)) == 1, (op, a, b, line)
        columns = [line.split("=") for kind, line in steps if kind.startswith("column")]
        results = [r for _, r in columns]
        if op == "add":
            assert all(re.fullmatch(r"\d\+\d(\+1)?", lhs) for lhs, _ in columns), steps
            assert _assemble(results) == a + b
        elif op == "sub":
            assert all(re.fullmatch(r"1?\d(-1)?-\d", lhs) and len(r) == 1 for lhs, r in columns), steps
            assert steps[0] == ("compare", f"{a}{'>' if a > b else '<' if a < b else '='}{b}")
            assert int("".join(reversed(results))) == abs(a - b)
        else:
            products = [line.split("=")[0] for kind, line in steps if kind == "digit product"]
            assert all(re.fullmatch(r"\d\*\d(\+\d)?", lhs) for lhs in products), steps
            assert len(columns) == ar.MUL_WIDTH and all(re.fullmatch(r"\d\+\d(\+1)?", lhs) for lhs, _ in columns)
            assert _assemble(results) == a * b
        assert ar.score_reply(ar.reply(op, a, b), ar.answer(op, a, b)) == {"correct": True, "format": True}
        assert ar.first_wrong_step(op, a, b, ar.reply(op, a, b)) is None


def test_first_wrong_step_names_the_kind_of_step():
    ref = ar.reply("mul", 17, 23)
    assert [k for k, _ in ar.scratchpad_steps("mul", 17, 23)] == (["digit product"] * 4 + ["partial products"]
                                                                  + ["column add"] * 4)
    assert ar.first_wrong_step("mul", 17, 23, ref.replace("1*3+2=5", "1*3+2=6")) == "digit product"
    assert ar.first_wrong_step("mul", 17, 23, ref.replace("0051+", "0061+")) == "partial products"
    assert ar.first_wrong_step("mul", 17, 23, ref.replace("5+4=9", "5+4=8")) == "column add"
    assert ar.first_wrong_step("mul", 17, 23, ref.replace("= 391", "= 381")) == "answer"
    assert ar.first_wrong_step("mul", 17, 23, ref.replace("0+0=0\n", "")) == "missing step"
    assert ar.first_wrong_step("mul", 17, 23, ref.replace("0+0=0\n", "0+0=0\n1+1=2\n")) == "extra step"
    assert ar.first_wrong_step("sub", 18, 36, "<think>\n18>36\n") == "compare"
    assert ar.first_wrong_step("sub", 51, 48, ar.reply("sub", 51, 48).replace("11-8=3", "11-8=2")) == "column sub"
    assert ar.first_wrong_step("add", 47, 38, "47 + 38 = 85") == "column add"  # no think block: step 1 differs


def test_splits_are_disjoint_and_about_a_tenth():
    train, held = set(ar.problems("train")), set(ar.problems("held_out"))
    assert not train & held and train | held == set(ALL)
    for op in ar.OPS:
        share = sum(p[0] == op for p in held) / 8100
        assert 0.08 < share < 0.12, (op, share)
    drawn = ar.sample_problems(np.random.default_rng(0), 2000)
    assert all(p[:3] in train for p in drawn)
    assert {p[0] for p in drawn} == set(ar.OPS) and {p[3] for p in drawn} == set(range(10))
    hard = ar.sample_problems(np.random.default_rng(0), 500, ops=("sub", "mul"))
    assert {p[0] for p in hard} == {"sub", "mul"} and all(p[:3] in train for p in hard)


def test_questions_use_every_phrasing():
    for op in ar.OPS:
        qs = {ar.question(op, 12, 34, k) for k in range(len(ar.PHRASINGS[op]))}
        assert len(qs) == len(ar.PHRASINGS[op]) and all("12" in q and "34" in q for q in qs)


@pytest.mark.parametrize("call, message", [
    (lambda: ar.answer("div", 12, 3), "unknown op 'div'"),
    (lambda: ar.answer("add", 9, 30), "operand a must be an integer in 10..99, got 9"),
    (lambda: ar.reply("mul", 12, 100), "operand b must be an integer in 10..99, got 100"),
    (lambda: ar.question("add", True, 12), "operand a"),
    (lambda: ar.question("add", 12, 13, 10), "phrasing must be in 0..9"),
    (lambda: ar.problems("test"), "split must be 'train' or 'held_out'"),
    (lambda: ar.sample_problems(np.random.default_rng(0), 3, ops=("mul", "div")), "ops must be a non-empty subset"),
    (lambda: ar.sample_problems(np.random.default_rng(0), 3, ops=()), "ops must be a non-empty subset"),
])
def test_bad_input_names_the_problem(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_score_reply():
    assert ar.score_reply("<think>\n1+2=3\n</think>\n12 + 34 = 46", 46) == {"correct": True, "format": True}
    assert ar.score_reply("<think>\nx\n</think>\n12 + 34 = 47", 46) == {"correct": False, "format": True}
    assert ar.score_reply("12 + 34 = 46", 46) == {"correct": True, "format": False}
    assert ar.score_reply("<think>\n46\n</think>\n", 46)["correct"] is False  # only the text after </think> counts
    assert ar.score_reply("<think></think>23 - 57 = -34", -34)["correct"] is True


def test_digits_are_single_tokens_and_the_chat_example_is_m1_format(tok):
    ids = tok.encode("17*23=391 and 4056")
    digit_tokens = [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
    assert digit_tokens == list("17233914056")
    ex = ar.chat_example(tok, "mul", 17, 23, 0)
    assert ex["prompt"] == ("<begin_of_document><beginning_of_sentence>user name=user\nWhat is 17 * 23?"
                            "<end_of_sentence>\n<beginning_of_sentence>ai name=assistant\n")
    assert ex["completion"] == ar.reply("mul", 17, 23) + "<end_of_sentence>" and ex["answer"] == 391
    full = tok.apply_chat_template([{"role": "user", "content": "What is 17 * 23?"},
                                    {"role": "assistant", "content": ar.reply("mul", 17, 23)}],
                                   add_generation_prompt=False)
    assert full.startswith(ex["prompt"] + ex["completion"])
    assert tok.encode(ex["completion"])[-1] == tok.eos_token_id


def test_write_dataset(tmp_path):
    counts = ar.write_dataset(tmp_path, sft_examples=30, rl_prompts=12, held_out=9)
    assert counts == {"sft.jsonl": 30, "rl.jsonl": 12, "held_out.jsonl": 9}
    tok = Tokenizer.from_pretrained(tmp_path / "tokenizer")
    assert tok.vocab_size == DEMO_VOCAB_SIZE and tok.eos_token_id == DEMO_VOCAB_SIZE - 3
    sft = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert all(r["completion"].startswith("<think>\n") and r["completion"].endswith("<end_of_sentence>") for r in sft)
    rl = [json.loads(line) for line in (tmp_path / "rl.jsonl").read_text().splitlines()]
    assert all(set(r) == {"prompt", "answer"} for r in rl)
    for r in rl:  # the default rl_ops: differences and products only
        a, b = map(int, re.findall(r"\d+", r["prompt"].split("user name=user")[1])[:2])
        assert r["answer"] in (a - b, b - a, a * b), r
    held = [json.loads(line) for line in (tmp_path / "held_out.jsonl").read_text().splitlines()]
    assert [r["op"] for r in held] == ["add"] * 3 + ["sub"] * 3 + ["mul"] * 3
    assert all(ar.is_held_out(r["op"], r["a"], r["b"]) and r["answer"] == ar.answer(r["op"], r["a"], r["b"])
               for r in held)
    assert held == json.loads(json.dumps(ar.held_out_rows(tok, 9)))  # the same rows the eval script uses
