"""The reward stage of the RL trainer: reward functions by name, scoring a rollout batch, the DAPO overlong
penalty and the shuffled-reward negative control.

Reward functions have the `m1jax.train.rewards` signature `fn(prompt: str, completion: str, **example) -> float`.
Besides the prompt's dataset fields, `example` carries `prompt_ids`, `completion_ids` (token-id lists) and
`finish_reason`, so token-level tasks need no tokenizer. Names in the run config are built-ins (`BUILTIN_REWARDS`)
or import paths `package.module:function` (the function itself is the reward).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import numpy as np
from m1jax.train.rewards import RewardScores, RewardSet, code_reward, math_answer_reward, think_format_reward
from m1jax.train.run_config import RewardsSpec, RunConfigError
from m1jax.train.tasks import reverse3


def reverse3_reward(prompt: str, completion: str, *, prompt_ids, completion_ids, **example) -> float:
    """Reverse-3 partial credit: 0.8 · (fraction of correct digit positions) + 0.2 · [EOS 4th] (token ids)."""
    return reverse3.reverse3_reward_tokens(prompt_ids, completion_ids)


def reverse3_exact_reward(prompt: str, completion: str, *, prompt_ids, completion_ids, **example) -> float:
    """1.0 iff the completion is exactly d3 d2 d1 EOS."""
    return float(reverse3.exact_match(np.asarray(prompt_ids)[None], np.asarray(completion_ids)[None])[0])


BUILTIN_REWARDS: dict[str, Callable[..., float]] = {
    "reverse3": reverse3_reward,
    "reverse3_exact": reverse3_exact_reward,
    "math_answer": math_answer_reward,
    "think_format": think_format_reward,
    "code": code_reward,
}


def resolve_reward(name: str) -> Callable[..., float]:
    """A built-in reward by name, or `module:function` imported."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    if ":" not in name:
        raise RunConfigError(f"run config field 'rewards': unknown reward {name!r}; built-ins are "
                             f"{sorted(BUILTIN_REWARDS)}, or give an import path 'package.module:function'")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RunConfigError(f"run config field 'rewards': cannot import {module_name!r} for reward {name!r}: {e}"
                             ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RunConfigError(f"run config field 'rewards': {module_name} has no callable {attr!r}")
    return fn


def build_reward_set(spec: RewardsSpec) -> RewardSet:
    """The weighted `RewardSet` of the run config (names as written there)."""
    functions = [(resolve_reward(r.name), r.weight) for r in spec.functions]
    names = [r.name.rpartition(":")[2] for r in spec.functions]
    if len(set(names)) != len(names):
        raise RunConfigError(f"run config field 'rewards': reward names must be unique, got {names}")
    return RewardSet(functions, on_error=spec.on_error, names=names)


def score_rollouts(reward_set: RewardSet, prompt_texts: Sequence[str], completion_texts: Sequence[str],
                   prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                   finish_reasons: Sequence[str], fields: Sequence[dict], *, workers: int = 1) -> RewardScores:
    """Score N rollouts: R_i = Σ_k w_k f_k(prompt_i, completion_i, **fields_i, prompt_ids=…, completion_ids=…,
    finish_reason=…). Sandboxed rewards (`code`) never affect the trainer process (see `m1jax.train.sandbox`)."""
    examples = [{**f, "prompt_ids": list(map(int, p)), "completion_ids": list(map(int, c)), "finish_reason": r}
                for f, p, c, r in zip(fields, prompt_ids, completion_ids, finish_reasons, strict=True)]
    return reward_set.score(list(prompt_texts), list(completion_texts), examples, max_workers=workers)


def overlong_penalty(lengths_N, max_new_tokens: int, cache_tokens: int, penalty: float = 1.0) -> np.ndarray:
    """DAPO soft overlong punishment (Eq. 13) for response lengths |y| ≤ L_max = max_new_tokens:

        R_len(y) = 0                                  if |y| ≤ L_max − L_cache
                 = (L_max − L_cache − |y|) / L_cache  if L_max − L_cache < |y| ≤ L_max     (→ −1 at L_max)

    scaled by `penalty`; added to the task reward."""
    lengths_N = np.asarray(lengths_N, np.float64)
    free = max_new_tokens - cache_tokens
    return penalty * np.clip((free - lengths_N) / cache_tokens, -1.0, 0.0)


def shuffle_within_batch(rewards_N: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Negative control: the batch's rewards randomly permuted across rows (and prompts). Learning signal gone,
    reward statistics of the batch kept."""
    return np.asarray(rewards_N)[rng.permutation(len(rewards_N))]
