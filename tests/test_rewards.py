"""Advantages (train/advantages.py), reward functions (train/rewards.py, train/sandbox.py), reverse-3 task."""

import os
import time

import chex
import numpy as np
import pytest
from m1jax.train.advantages import dynamic_sampling_filter, group_advantages
from m1jax.train.rewards import (
    RewardFunctionError,
    RewardSet,
    combine_rewards,
    extract_boxed,
    extract_code,
    extract_math_answer,
    make_code_reward,
    math_answer_reward,
    parse_number,
    think_format_reward,
)
from m1jax.train.sandbox import SandboxLimits, run_assert_tests, run_script
from m1jax.train.tasks import reverse3

# ----------------------------------------------------------------------------------------------- advantages


def test_group_zscore_is_exact():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.3, 0.9, 0.6, 0.0])
    gid = np.array([5, 5, 5, 5, 2, 2, 2, 2, 9, 9, 9, 9])
    adv, info = group_advantages(rewards, gid, std="group", eps=1e-6)
    chex.assert_shape(adv, (12,))
    chex.assert_type(adv, np.float32)
    expected = np.empty(12)
    for g in (5, 9):
        r = rewards[gid == g]
        expected[gid == g] = (r - r.mean()) / (r.std() + 1e-6)
    expected[gid == 2] = 0.0
    np.testing.assert_allclose(adv, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(adv[:4], [1, -1, -1, 1], atol=1e-5)  # +-0.5 / 0.5
    assert np.all(adv[4:8] == 0.0)  # exactly zero, not residue / eps
    assert info == {"num_groups": 3, "num_zero_std_groups": 1, "frac_zero_std": 1 / 3,
                    "reward_mean": pytest.approx(rewards.mean()), "reward_std": pytest.approx(rewards.std())}
    # ddof=1 (TRL/verl's unbiased std) scales non-zero groups by sqrt((G-1)/G)
    adv1, _ = group_advantages(rewards, gid, ddof=1, eps=0.0)
    adv0, _ = group_advantages(rewards, gid, ddof=0, eps=0.0)
    np.testing.assert_allclose(adv1, adv0 * np.sqrt(3 / 4), rtol=1e-6)


def test_zero_std_groups_are_exactly_zero_and_counted():
    # 0.1 * 3 is not exactly representable: a naive mean leaves a ~1e-17 residue that eps would blow up.
    rewards = np.array([0.1, 0.1, 0.1, 0.7, 1.0, 0.0, 0.3])
    gid = np.array([0, 0, 0, 1, 2, 2, 3])  # group 1 and 3 have one member each
    for std in ("group", "batch", None):
        adv, info = group_advantages(rewards, gid, std=std, eps=1e-6)
        assert np.all(adv[[0, 1, 2, 3, 6]] == 0.0)
        assert info["num_groups"] == 4 and info["num_zero_std_groups"] == 3
        assert info["frac_zero_std"] == 0.75
    adv, _ = group_advantages(rewards, gid, eps=0.0)  # no 0/0 NaN either
    assert np.all(np.isfinite(adv))


def test_batch_std_and_no_std_options():
    rewards = np.array([1.0, 0.0, 3.0, 1.0, 2.0, 2.0])
    gid = np.array([1, 1, 4, 4, 8, 8])
    centered = np.array([0.5, -0.5, 1.0, -1.0, 0.0, 0.0])
    adv_batch, _ = group_advantages(rewards, gid, std="batch", eps=1e-6)
    np.testing.assert_allclose(adv_batch, centered / (rewards.std() + 1e-6), rtol=1e-6)
    adv_none, _ = group_advantages(rewards, gid, std=None)
    np.testing.assert_allclose(adv_none, centered, rtol=1e-7)
    with pytest.raises(ValueError, match="std must be"):
        group_advantages(rewards, gid, std="prompt")
    with pytest.raises(ValueError, match="finite"):
        group_advantages([1.0, np.nan], [0, 0])
    with pytest.raises(ValueError, match="integers"):
        group_advantages([1.0, 0.0], [0.0, 0.0])


def test_dynamic_sampling_filter_drops_zero_std_groups():
    rewards = np.array([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.2, 0.4])
    gid = np.array([3, 3, 7, 7, 1, 1, 3, 7])  # unsorted ids; group 3 = rows 0, 1, 6
    kept = dynamic_sampling_filter(rewards, gid)
    np.testing.assert_array_equal(kept, [0, 1, 2, 3, 6, 7])  # group 1 (all 0.0) dropped
    assert kept.dtype == np.int64


# ----------------------------------------------------------------------------------------------- math


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        (r"so the answer is \boxed{42}.", 42, 1.0),
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{\dfrac{1}{2}}", "1/2", 1.0),
        (r"\boxed{0.50}", r"\frac12", 1.0),
        (r"$\boxed{1,000}$", "1000", 1.0),
        (r"The total is 1,000 dollars.", 1000, 1.0),
        (r"\boxed{ -\frac{3}{4} }", "-0.75", 1.0),
        (r"\boxed{x = 5}", "5", 1.0),
        (r"\boxed{\text{5}}", "5", 1.0),
        (r"\boxed{90^\circ}", "90", 1.0),
        (r"\boxed{\sqrt{2}}", r"\sqrt{2}", 1.0),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\dfrac{\sqrt{3}}{2}", 1.0),
        (r"\boxed{\left(1, 2\right)}", "(1,2)", 1.0),
        (r"first \boxed{3} then \boxed{4}", 4, 1.0),  # the last box counts
        (r"<think>maybe \boxed{7}</think> it is 8", 8, 1.0),  # only the text after </think>
        (r"\boxed{0.5}", "0.51", 0.0),
        (r"\boxed{1/3}", "0.333", 0.0),  # exact, not approximate
        (r"I have 3 apples and 5 pears", 3, 0.0),  # fallback takes the LAST number
        (r"no number here", 3, 0.0),
        (r"\boxed{12}", 1.2, 0.0),
    ],
)
def test_math_answer_reward(completion, answer, expected):
    assert math_answer_reward("q", completion, answer=answer) == expected


def test_math_extraction_helpers():
    assert extract_boxed(r"a \boxed{\frac{a^{2}}{b}} b") == r"\frac{a^{2}}{b}"
    assert extract_boxed(r"\boxed{unbalanced") is None
    assert extract_boxed(r"\boxed 7") == "7"
    assert extract_math_answer("x = -3.25 or y = 2/3") == "2/3"
    assert parse_number("1,234,567.5") == parse_number("2469135/2")
    assert parse_number("1e3") == 1000
    assert parse_number("1,2") is None  # not a thousands grouping
    assert parse_number(r"\frac{1}{0}") is None


# ----------------------------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    "prompt, completion, expected",
    [
        ("q", "<think>reasoning</think>The answer is 4.", 1.0),
        ("q", "  <think>\nmulti\nline\n</think>\n\n4", 1.0),
        ("q", "<think>reasoning</think>   \n", 0.0),  # empty answer
        ("q", "The answer is 4.", 0.0),
        ("q", "<think>a</think>b<think>c</think>d", 0.0),
        ("q", "<think>unclosed", 0.0),
        ("q", "text <think>a</think> b", 0.0),  # must start with the thinking block
        ("q", "reasoning</think>4", 0.0),
        ("chat template <think>\n", "reasoning</think>4", 1.0),  # the template opened the block
    ],
)
def test_think_format_reward(prompt, completion, expected):
    assert think_format_reward(prompt, completion) == expected


# ----------------------------------------------------------------------------------------------- combination


def test_reward_set_weights_and_per_function_values():
    rs = combine_rewards([(math_answer_reward, 1.0), (think_format_reward, 0.2)])
    completions = ["<think>x</think>\\boxed{4}", "\\boxed{4}", "<think>x</think>\\boxed{5}"]
    scores = rs.score(["q"] * 3, completions, [{"answer": 4}] * 3)
    np.testing.assert_allclose(scores.per_function["math_answer_reward"], [1.0, 1.0, 0.0])
    np.testing.assert_allclose(scores.per_function["think_format_reward"], [1.0, 0.0, 1.0])
    np.testing.assert_allclose(scores.total, [1.2, 1.0, 0.2])
    assert scores.errors == {"math_answer_reward": 0, "think_format_reward": 0}
    m = scores.metrics()
    assert m["reward/mean"] == pytest.approx(0.8) and m["reward/think_format_reward/mean"] == pytest.approx(2 / 3)
    assert rs("q", completions[0], answer=4) == pytest.approx(1.2)  # a RewardSet is itself a reward function
    threaded = rs.score(["q"] * 3, completions, [{"answer": 4}] * 3, max_workers=3)
    np.testing.assert_array_equal(threaded.total, scores.total)


def test_reward_set_errors_name_the_function():
    def flaky(prompt, completion, **example):
        if "boom" in completion:
            raise KeyError("missing field")
        return 1.0

    def returns_nan(prompt, completion, **example):
        return float("nan")

    with pytest.raises(RewardFunctionError, match=r"'flaky' failed on sample 1: KeyError") as info:
        RewardSet([flaky]).score(["q", "q"], ["ok", "boom"])
    assert info.value.name == "flaky" and info.value.index == 1 and isinstance(info.value.__cause__, KeyError)
    with pytest.raises(RewardFunctionError, match="returns_nan"):
        RewardSet([returns_nan])("q", "a")
    lenient = RewardSet([(flaky, 2.0)], on_error="default", default=-1.0).score(["q", "q"], ["ok", "boom"])
    np.testing.assert_array_equal(lenient.total, [2.0, -2.0])
    assert lenient.errors == {"flaky": 1}
    with pytest.raises(ValueError, match="unique"):
        RewardSet([flaky, flaky], names=["a", "a"])
    with pytest.raises(ValueError, match="finite weight"):
        RewardSet([(flaky, float("inf"))])
    with pytest.raises(ValueError, match="finite weight"):
        RewardSet([3.0])
    assert RewardSet([flaky, flaky]).names == ["flaky", "flaky_2"]


# ----------------------------------------------------------------------------------------------- code

FAST = SandboxLimits(timeout_s=1.0, memory_mb=512)
code_reward = make_code_reward(FAST)

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add('a', 'b') == 'ab'"]


def test_extract_code():
    completion = "<think>```python\nwrong\n```</think>Here:\n```python\nx = 1\n```\nand\n```py\nx = 2\n```\n"
    assert extract_code(completion) == "x = 2\n"
    assert extract_code("```\nprint(1)\n```") == "print(1)\n"
    assert extract_code("```text\nhi\n```\nprint(3)") == "```text\nhi\n```\nprint(3)"


def test_code_reward_correct_and_wrong_code():
    assert code_reward("q", f"```python\n{ADD}```", tests=ADD_TESTS) == 1.0
    wrong = "```python\ndef add(a, b):\n    return abs(a + b)\n```"
    assert code_reward("q", wrong, tests=ADD_TESTS) == pytest.approx(2 / 3)  # abs('ab') raises
    assert code_reward("q", "```python\ndef add(a, b) return\n```", tests=ADD_TESTS) == 0.0  # syntax error


def test_code_reward_stdin_stdout_cases():
    program = "```python\nn = int(input())\nprint(n * n)\nif n == 3:\n    raise SystemExit(1)\n```"
    tests = [("2\n", "4\n"), {"input": "5", "output": "25  \n\n"}, ("3", "9"), ("4", "15")]
    # case 3 prints 9 but exits with status 1; case 4 is wrong
    assert code_reward("q", program, tests=tests) == 0.5
    mixed = "```python\ndef sq(n):\n    return n * n\nif __name__ == '__main__':\n    print(sq(int(input())))\n```"
    assert code_reward("q", mixed, tests=["assert sq(3) == 9", ("7", "49")]) == 1.0


@pytest.mark.parametrize(
    "bad_test, name",
    [
        ("while True:\n    pass", "infinite loop"),
        ("import ctypes; ctypes.string_at(0)", "segfault"),
        ("import os; os._exit(0)", "os._exit(0)"),
        ("import sys; sys.exit(0)", "sys.exit(0)"),
        ("raise RuntimeError('boom')", "exception"),
        ("x = bytearray(8 * 1024 ** 3)", "memory bomb (one allocation)"),
        ("x = []\nwhile True: x.append(bytearray(10 ** 7))", "memory bomb (growing)"),
        ("import time; time.sleep(60)", "sleep"),
    ],
)
def test_bad_test_fails_alone_and_never_hangs(bad_test, name):
    start = time.monotonic()
    passed = run_assert_tests("def f(x):\n    return x + 1\n", ["assert f(1) == 2", bad_test, "assert f(2) == 3"],
                              limits=FAST)
    elapsed = time.monotonic() - start
    assert passed == [True, False, True], name
    assert elapsed < FAST.timeout_s + 4.0, f"{name} took {elapsed:.1f}s"


@pytest.mark.parametrize(
    "module, name",
    [
        ("while True:\n    pass\n", "infinite loop"),
        ("import ctypes\nctypes.string_at(0)\n", "segfault"),
        ("import os\nos._exit(0)\n", "os._exit before tests"),
        ("import sys\nsys.exit(0)\n", "sys.exit before tests"),
        ("raise ValueError('x')\n", "exception"),
        ("x = ' ' * (8 * 1024 ** 3)\n", "memory bomb"),
    ],
)
def test_bad_program_scores_zero_quickly(module, name):
    start = time.monotonic()
    reward = code_reward("q", f"```python\n{module}def f(x):\n    return x + 1\n```", tests=["assert f(1) == 2"] * 3)
    assert reward == 0.0, name
    assert time.monotonic() - start < FAST.timeout_s + 4.0, name


def test_script_runner_limits_and_isolation(monkeypatch):
    monkeypatch.setenv("M1JAX_SECRET_TOKEN", "hunter2")
    r = run_script("import os, sys\nprint(os.getcwd(), os.environ.get('M1JAX_SECRET_TOKEN'), sys.flags.isolated)",
                   limits=FAST)
    cwd, token, isolated = r.stdout.split()
    assert r.ok and token == "None" and isolated == "1" and "m1jax_sandbox_" in cwd
    assert not os.path.exists(cwd)  # the temp dir is removed after the run
    r = run_script("while True:\n    pass", limits=FAST)
    assert r.timed_out and not r.ok and r.returncode is None
    r = run_script("import ctypes; ctypes.string_at(0)", limits=FAST)
    assert r.returncode == -11  # SIGSEGV, reported, not propagated
    r = run_script("print('x' * (4 << 20))", limits=SandboxLimits(timeout_s=2.0, file_size_mb=1))
    assert not r.ok  # output beyond RLIMIT_FSIZE kills the program (SIGXFSZ)
    r = run_script("import resource; print(resource.getrlimit(resource.RLIMIT_AS))", limits=FAST)
    assert r.stdout.strip() == str((512 << 20, 512 << 20))


def test_code_reward_rejects_malformed_tests():
    with pytest.raises(ValueError, match="non-empty list"):
        code_reward("q", "x = 1", tests=[])
    with pytest.raises(ValueError, match="neither"):
        code_reward("q", "x = 1", tests=[("a", "b", "c")])


# ----------------------------------------------------------------------------------------------- reverse3


def _ids(*tokens):
    """Readable test input: ints are digits, strings are special tokens."""
    special = {"BOS": reverse3.BOS, "SEP": reverse3.SEP, "EOS": reverse3.EOS, "PAD": reverse3.PAD}
    return [special[t] if isinstance(t, str) else reverse3.DIGIT_0 + t for t in tokens]


def test_reverse3_vocabulary_and_sampler():
    assert reverse3.VOCAB_SIZE == 14 and len({reverse3.PAD, reverse3.BOS, reverse3.SEP, reverse3.EOS}) == 4
    prompts, digits = reverse3.sample_prompts(np.random.default_rng(0), 64)
    chex.assert_shape(prompts, (64, 5))
    chex.assert_type(prompts, np.int32)
    assert np.all(prompts[:, 0] == reverse3.BOS) and np.all(prompts[:, 4] == reverse3.SEP)
    np.testing.assert_array_equal(prompts[:, 1:4] - reverse3.DIGIT_0, digits)
    targets = reverse3.target_ids(prompts)
    np.testing.assert_array_equal(targets[:, :3], prompts[:, 3:0:-1])
    assert np.all(targets[:, 3] == reverse3.EOS)
    np.testing.assert_array_equal(reverse3.reverse3_rewards(prompts, targets), np.ones(64, np.float32))
    assert reverse3.exact_match(prompts, targets).all()
    again, _ = reverse3.sample_prompts(np.random.default_rng(0), 64)
    np.testing.assert_array_equal(again, prompts)  # reproducible from the Generator
    assert reverse3.decode(_ids("BOS", 1, 2, 3, "SEP")) == "<bos> 1 2 3 <sep>"


@pytest.mark.parametrize(
    "completion, expected",
    [
        ((3, 2, 1, "EOS"), 1.0),
        ((3, 2, 1, "EOS", 5, 5), 1.0),  # after EOS is ignored
        ((3, 2, 1, 7), 0.8),  # no EOS
        ((3, 2, 9, "EOS"), 0.8 * 2 / 3 + 0.2),
        ((1, 2, 3, "EOS"), 0.8 / 3 + 0.2),  # only the middle digit is right
        ((3, "EOS", 1, "EOS"), 0.8 / 3),  # stopped after one digit: the 1 at position 3 is not generated
        (("EOS",), 0.0),
        ((3, 2), 0.8 * 2 / 3),  # truncated
        ((), 0.0),
        ((3, 2, 1, "PAD", "EOS"), 0.8),  # EOS at position 5
    ],
)
def test_reverse3_reward_hand_examples(completion, expected):
    prompt = _ids("BOS", 1, 2, 3, "SEP")
    assert reverse3.reverse3_reward_tokens(prompt, _ids(*completion), eos_id=reverse3.EOS) == pytest.approx(expected)
    left_padded = _ids("PAD", "PAD") + prompt
    assert reverse3.reverse3_reward_tokens(left_padded, _ids(*completion)) == pytest.approx(expected)


def test_reverse3_rejects_malformed_prompts():
    with pytest.raises(ValueError, match="BOS d d d SEP"):
        reverse3.reverse3_reward_tokens(_ids("BOS", 1, 2, "SEP", "SEP"), _ids(1))
    with pytest.raises(ValueError, match="BOS d d d SEP"):
        reverse3.reverse3_reward_tokens(_ids("BOS", "BOS", 1, 2, 3, "SEP"), _ids(1))


def test_reverse3_random_policy_expectation():
    """Uniform over the 14 tokens until EOS: E[R] = 0.8/3 * sum_k q^k / V + 0.2 q^3 / V = 0.0646 (q = 13/14)."""
    v, q = 14, 13 / 14
    analytic = reverse3.random_policy_expected_reward()
    assert analytic == pytest.approx(0.8 * (1 + q + q**2) / (3 * v) + 0.2 * q**3 / v)
    assert analytic == pytest.approx(0.065, abs=1e-3)
    rng = np.random.default_rng(0)
    n = 200_000
    prompts, _ = reverse3.sample_prompts(rng, n)
    completions = rng.integers(0, v, size=(n, 4))
    rewards = reverse3.reverse3_rewards(prompts, completions)
    stderr = rewards.std() / np.sqrt(n)
    assert abs(rewards.mean() - analytic) < 4 * stderr
    # The vectorised and the per-sample reward agree.
    for i in range(200):
        assert reverse3.reverse3_reward_tokens(prompts[i], completions[i]) == pytest.approx(float(rewards[i]))
