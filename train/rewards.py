"""Reward functions on text and their weighted combination.

A reward function is a plain callable `fn(prompt: str, completion: str, **example) -> float`; `example` holds
the dataset fields of the sample (e.g. `answer`, `tests`), minus any keys named `prompt`/`completion`.

`RewardSet([(fn, weight), ...])` (or `combine_rewards`) scores a batch: R_i = sum_k w_k * f_k(prompt_i, ...),
and keeps every function's raw values for per-reward metrics. Error policy (choose with `on_error`):

* "raise" (default): an exception (or a non-finite / non-numeric return) stops scoring with a
  `RewardFunctionError` that names the function and the sample index and chains the original exception.
  A reward bug then fails loudly instead of silently training on zeros.
* "default": the call is scored `default` (0.0 unless set) and counted in `RewardScores.errors[name]`.

Built-ins: `math_answer_reward`, `think_format_reward`, `code_reward` (see each docstring). Where a completion
contains `</think>`, the answer-checking rewards look only at the text after the last `</think>`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
from m1jax.train import sandbox

RewardFn = Callable[..., float]
ON_ERROR = ("raise", "default")


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned a non-finite value; `.name` and `.index` locate it."""

    def __init__(self, name: str, index: int | None, message: str):
        where = "" if index is None else f" on sample {index}"
        super().__init__(f"reward function {name!r} failed{where}: {message}")
        self.name, self.index = name, index


@dataclasses.dataclass(frozen=True)
class RewardScores:
    """total [N] = sum_k weight_k * per_function[name_k]; per_function holds the raw (unweighted) values."""

    total: np.ndarray
    per_function: dict[str, np.ndarray]
    weights: dict[str, float]
    errors: dict[str, int]

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        out = {f"{prefix}/mean": float(np.mean(self.total)) if self.total.size else 0.0,
               f"{prefix}/std": float(np.std(self.total)) if self.total.size else 0.0}
        for name, values in self.per_function.items():
            out[f"{prefix}/{name}/mean"] = float(np.mean(values)) if values.size else 0.0
            out[f"{prefix}/{name}/errors"] = float(self.errors[name])
        return out


def _function_name(fn: Callable) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


class RewardSet:
    """Weighted sum of reward functions with per-function values; itself a reward function (returns R)."""

    def __init__(
        self,
        functions: Iterable[tuple[RewardFn, float] | RewardFn],
        *,
        on_error: str = "raise",
        default: float = 0.0,
        names: Sequence[str] | None = None,
    ):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        pairs = []
        for item in functions:
            if callable(item):
                item = (item, 1.0)
            if not (isinstance(item, Sequence) and len(item) == 2 and callable(item[0])
                    and isinstance(item[1], (int, float, np.integer, np.floating)) and math.isfinite(item[1])):
                raise ValueError(f"expected a reward function or a (function, finite weight) pair, got {item!r}")
            pairs.append((item[0], float(item[1])))
        if not pairs:
            raise ValueError("RewardSet needs at least one reward function")
        if names is None:
            names, seen = [], {}
            for fn, _ in pairs:
                base = _function_name(fn)
                seen[base] = seen.get(base, 0) + 1
                names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
        if len(names) != len(pairs) or len(set(names)) != len(names):
            raise ValueError(f"names must be unique, one per function; got {list(names)}")
        self.functions = [fn for fn, _ in pairs]
        self.weights = {name: float(w) for name, (_, w) in zip(names, pairs)}
        self.names = list(names)
        self.on_error, self.default = on_error, float(default)
        self.__name__ = "reward_set"

    def _call_one(self, k: int, prompt: str, completion: str, example: Mapping[str, Any], index: int | None):
        """(value, failed) of function k on one sample, per the error policy."""
        fn, name = self.functions[k], self.names[k]
        kwargs = {key: v for key, v in example.items() if key not in ("prompt", "completion")}
        try:
            value = fn(prompt, completion, **kwargs)
            if isinstance(value, (bool, np.bool_)):
                value = float(value)
            if not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
                raise TypeError(f"returned {value!r}; a reward must be a finite real number")
            return float(value), False
        except Exception as e:  # noqa: BLE001 - the policy decides; the original is chained
            if self.on_error == "raise":
                raise RewardFunctionError(name, index, f"{type(e).__name__}: {e}") from e
            return self.default, True

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        examples: Sequence[Mapping[str, Any]] | None = None,
        *,
        max_workers: int = 1,
    ) -> RewardScores:
        """Score N samples. `max_workers` > 1 scores samples in threads (worth it for `code_reward`, whose
        subprocesses release the GIL); results keep sample order."""
        n = len(prompts)
        if len(completions) != n or (examples is not None and len(examples) != n):
            raise ValueError(f"prompts, completions, examples must have equal lengths; got {n}, "
                             f"{len(completions)}, {None if examples is None else len(examples)}")
        examples = [{}] * n if examples is None else examples

        def one(i):
            return [self._call_one(k, prompts[i], completions[i], examples[i], i) for k in range(len(self.names))]

        if max_workers > 1 and n > 1:
            with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
                rows = list(pool.map(one, range(n)))
        else:
            rows = [one(i) for i in range(n)]
        per_function = {name: np.array([r[k][0] for r in rows], np.float64) for k, name in enumerate(self.names)}
        errors = {name: sum(r[k][1] for r in rows) for k, name in enumerate(self.names)}
        total = np.zeros(n, np.float64)
        for name, values in per_function.items():
            total += self.weights[name] * values
        return RewardScores(total=total, per_function=per_function, weights=dict(self.weights), errors=errors)

    def __call__(self, prompt: str, completion: str, **example) -> float:
        values = [self._call_one(k, prompt, completion, example, None)[0] for k in range(len(self.names))]
        return float(sum(self.weights[name] * v for name, v in zip(self.names, values)))


def combine_rewards(functions: Iterable[tuple[RewardFn, float] | RewardFn], **kwargs) -> RewardSet:
    """`RewardSet(functions, **kwargs)`: weighted sum of reward functions (bare callables get weight 1)."""
    return RewardSet(functions, **kwargs)


# ----------------------------------------------------------------------------------------------- math answers


def answer_text(completion: str) -> str:
    """The part of a completion after the last `</think>` (the whole completion if there is none)."""
    cut = completion.rfind("</think>")
    return completion if cut < 0 else completion[cut + len("</think>"):]


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces matched; `\\boxed 5` also works.
    None when absent or unbalanced."""
    for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)", text))):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1:j]
            continue  # unbalanced: try an earlier box
        bare = re.match(r"\s+([^\s$]+)", text[i:])
        if bare:
            return bare.group(1)
    return None


_NUMBER_IN_TEXT = re.compile(r"(?<![\w.])[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:/\d+)?")


def extract_last_number(text: str) -> str | None:
    """The last number in free text: integers, "1,000", decimals, "-3", "1/2"."""
    found = _NUMBER_IN_TEXT.findall(text)
    return found[-1] if found else None


def extract_math_answer(completion: str) -> str | None:
    """Answer of a completion: the last \\boxed{...} after `</think>`, else the last number there."""
    text = answer_text(completion)
    boxed = extract_boxed(text)
    return boxed if boxed is not None else extract_last_number(text)


def _unwrap_commands(s: str, commands: Sequence[str]) -> str:
    pattern = re.compile(r"\\(?:%s)\s*\{([^{}]*)\}" % "|".join(commands))
    while True:
        new = pattern.sub(r"\1", s)
        if new == s:
            return s
        s = new


def normalize_math_answer(answer: str) -> str:
    """Canonical string: no $ / spaces / \\left \\right / spacing commands / \\text{} wrappers / degree and
    percent signs / trailing period; \\dfrac and \\tfrac -> \\frac; a leading "x =" dropped."""
    s = str(answer).strip()
    s = _unwrap_commands(s, ("text", "textbf", "mathrm", "mathbf", "boxed"))
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "$", "~", "^\\circ", "^{\\circ}",
                  "\\circ", "\\%", "%", "\\displaystyle"):
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s).rstrip(".")
    m = re.fullmatch(r"[A-Za-z]\w*=(.+)", s)
    if m and "=" not in m.group(1):
        s = m.group(1)
    return s


_PLAIN = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def parse_number(answer: str) -> Fraction | None:
    """Exact rational value of a normalized answer, or None: "1,000", "0.50", "-3", "1e3", "1/2",
    "\\frac{1}{2}", "-\\frac{3}{4}", "\\frac12"."""
    s = normalize_math_answer(answer)
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    try:
        if re.fullmatch(_PLAIN, s):
            return Fraction(s)
        m = re.fullmatch(r"([-+]?\d+)/(\d+)", s)
        if m:
            return Fraction(int(m.group(1)), int(m.group(2))) if int(m.group(2)) else None
        m = re.fullmatch(r"([-+]?)\\frac(?:\{(%s)\}\{(%s)\}|(\d)(\d))" % (_PLAIN, _PLAIN), s)
        if m:
            num, den = Fraction(m.group(2) or m.group(4)), Fraction(m.group(3) or m.group(5))
            return None if den == 0 else (-1 if m.group(1) == "-" else 1) * num / den
    except (ValueError, ZeroDivisionError):
        return None
    return None


def math_answers_equal(predicted: str, reference: Any) -> bool:
    """Exact equality: as rationals when both parse as numbers, else as normalized strings."""
    reference = str(reference)
    p, r = parse_number(predicted), parse_number(reference)
    if p is not None and r is not None:
        return p == r
    return normalize_math_answer(predicted) == normalize_math_answer(reference)


def math_answer_reward(prompt: str, completion: str, *, answer: Any, **example) -> float:
    """1.0 when the completion's answer (last \\boxed{...} after `</think>`, else the last number) equals
    `answer` exactly (numbers compared as rationals: "1,000" == 1000, "0.50" == "1/2" == "\\frac{1}{2}"),
    else 0.0."""
    predicted = extract_math_answer(completion)
    return float(predicted is not None and math_answers_equal(predicted, answer))


# ----------------------------------------------------------------------------------------------- format


_THINK = re.compile(r"\s*<think>(?P<think>.*?)</think>(?P<answer>.*)", re.DOTALL)


def think_format_reward(prompt: str, completion: str, **example) -> float:
    """1.0 iff the completion is `<think>...</think>` followed by non-empty (non-whitespace) answer text, with
    exactly one of each tag, else 0.0. If the prompt already ends with `<think>` (chat templates that open the
    thinking block), the completion may start directly with the thinking text."""
    if prompt.rstrip().endswith("<think>") and not completion.lstrip().startswith("<think>"):
        completion = "<think>" + completion
    if completion.count("<think>") != 1 or completion.count("</think>") != 1:
        return 0.0
    m = _THINK.fullmatch(completion)
    return float(bool(m and m.group("answer").strip()))


# ----------------------------------------------------------------------------------------------- code


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """Program in a completion (after `</think>`): the last ```python / ```py / ```python3 fenced block, else
    the last unlabelled ``` block, else the whole text."""
    text = answer_text(completion)
    blocks = _FENCE.findall(text)
    for wanted in (("python", "py", "python3"), ("",)):
        chosen = [code for lang, code in blocks if lang.lower() in wanted]
        if chosen:
            return chosen[-1]
    return text


def _split_tests(tests) -> tuple[list[tuple[int, str]], list[tuple[int, str, str]]]:
    """Assert snippets and (stdin, expected stdout) cases, each with its position in `tests`."""
    if isinstance(tests, (str, bytes)) or not isinstance(tests, Sequence) or len(tests) == 0:
        raise ValueError("example['tests'] must be a non-empty list of assert snippets or (input, output) cases")
    asserts, io_cases = [], []
    for i, t in enumerate(tests):
        if isinstance(t, str):
            asserts.append((i, t))
        elif isinstance(t, Mapping) and "input" in t and "output" in t:
            io_cases.append((i, str(t["input"]), str(t["output"])))
        elif isinstance(t, Sequence) and len(t) == 2:
            io_cases.append((i, str(t[0]), str(t[1])))
        else:
            raise ValueError(f"test {i} is neither an assert snippet (str) nor an (input, output) case: {t!r}")
    return asserts, io_cases


def _normalize_output(s: str) -> list[str]:
    lines = [line.rstrip() for line in s.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def run_code_tests(code: str, tests, *, limits: sandbox.SandboxLimits = sandbox.SandboxLimits()) -> list[bool]:
    """Pass/fail per test, in the order of `tests` (see `make_code_reward` for the formats)."""
    asserts, io_cases = _split_tests(tests)
    passed = [False] * len(tests)
    if asserts:
        for (i, _), ok in zip(asserts, sandbox.run_assert_tests(code, [t for _, t in asserts], limits=limits)):
            passed[i] = ok
    for i, stdin, expected in io_cases:
        result = sandbox.run_script(code, stdin=stdin, limits=limits)
        passed[i] = result.ok and _normalize_output(result.stdout) == _normalize_output(expected)
    return passed


def make_code_reward(limits: sandbox.SandboxLimits = sandbox.SandboxLimits()) -> RewardFn:
    """A reward `fn(prompt, completion, *, tests, **example) -> fraction of tests passed` in [0, 1].

    The program is `extract_code(completion)`. `tests` is a list mixing two kinds:
    * a string: Python run after the program in the same namespace (e.g. "assert add(1, 2) == 3"); it passes
      if it raises nothing. All assert tests share one sandboxed interpreter (the program's module body runs
      once, with `__name__ == "solution"`); a test that hangs or crashes fails alone.
    * `(input, expected_output)` or `{"input": ..., "output": ...}`: the program runs as `__main__` with that
      stdin, one sandboxed interpreter per case; it passes if it exits with status 0 and its stdout equals the
      expected output up to trailing whitespace on each line and trailing blank lines.
    Every test gets `limits.timeout_s` of wall clock; hangs, crashes, and exits count as failures and never
    affect the caller (see `m1jax.train.sandbox`). Malformed `tests` raise ValueError.
    """

    def code_reward(prompt: str, completion: str, *, tests, **example) -> float:
        passed = run_code_tests(extract_code(completion), tests, limits=limits)
        return sum(passed) / len(passed)

    return code_reward


code_reward = make_code_reward()
