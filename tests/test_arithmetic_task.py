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
    assert ar.reply("mul", 17, 23) == ("<think>\n17*3=10*3+7*3=30+21=51\n17*2=10*2+7*2=20+14=34\n17*20=340\n"
                                       "340+51=391\n</think>\n17 * 23 = 391")
    assert ar.scratchpad("sub", 23, 57) == "20-50=-30\n3-7=-4\n-30-4=-34"


def test_every_scratchpad_step_is_true_and_ends_with_the_answer():
    """All 3 × 8100 problems: each line `e1=e2=...` holds (every side evaluated exactly), the last line's result
    is the answer, and the reply's answer after </think> is the answer."""
    for op, a, b in ALL:
        lines = ar.scratchpad(op, a, b).split("\n")
        for line in lines:
            assert re.fullmatch(r"[-+*=0-9]+", line), line
            sides = [eval(side) for side in line.split("=")]  # noqa: S307 - digits and + - * only (checked above)
            assert len(set(sides)) == 1, (op, a, b, line)
        assert int(lines[-1].split("=")[-1]) == ar.answer(op, a, b)
        assert ar.score_reply(ar.reply(op, a, b), ar.answer(op, a, b)) == {"correct": True, "format": True}


def test_first_wrong_step_names_the_kind_of_step():
    ref = ar.reply("mul", 17, 23)
    assert [k for k, _ in ar.scratchpad_steps("mul", 17, 23)] == ["partial product"] * 2 + ["shift", "final addition"]
    assert ar.first_wrong_step("mul", 17, 23, ref) is None
    assert ar.first_wrong_step("mul", 17, 23, ref.replace("30+21=51", "30+21=41")) == "partial product"
    assert ar.first_wrong_step("mul", 17, 23, ref.replace("340+51=391", "340+51=361")) == "final addition"
    assert ar.first_wrong_step("mul", 17, 23, ref.replace("= 391", "= 381")) == "answer"
    assert ar.first_wrong_step("mul", 17, 23, ref.replace("\n340+51=391", "")) == "missing step"
    assert ar.first_wrong_step("mul", 17, 23, ref.replace("=391\n", "=391\n1+1=2\n")) == "extra step"
    assert ar.first_wrong_step("sub", 51, 48, ar.reply("sub", 51, 48).replace("10-7=3", "10-7=7")) == "combine"
    assert ar.first_wrong_step("add", 47, 38, "47 + 38 = 85") == "tens"  # no think block: the first step differs


def test_splits_are_disjoint_and_about_a_tenth():
    train, held = set(ar.problems("train")), set(ar.problems("held_out"))
    assert not train & held and train | held == set(ALL)
    for op in ar.OPS:
        share = sum(p[0] == op for p in held) / 8100
        assert 0.08 < share < 0.12, (op, share)
    drawn = ar.sample_problems(np.random.default_rng(0), 2000)
    assert all(p[:3] in train for p in drawn)
    assert {p[0] for p in drawn} == set(ar.OPS) and {p[3] for p in drawn} == set(range(10))


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
    held = [json.loads(line) for line in (tmp_path / "held_out.jsonl").read_text().splitlines()]
    assert [r["op"] for r in held] == ["add"] * 3 + ["sub"] * 3 + ["mul"] * 3
    assert all(ar.is_held_out(r["op"], r["a"], r["b"]) and r["answer"] == ar.answer(r["op"], r["a"], r["b"])
               for r in held)
    assert held == json.loads(json.dumps(ar.held_out_rows(tok, 9)))  # the same rows the eval script uses
