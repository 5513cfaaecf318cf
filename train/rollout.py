"""Rollouts with the generation engine: G samples per prompt, deterministic per-sample seeds, and the packing of
prompts + responses into fixed-shape trainer batches.

Seeds: sample s of prompt p at step t of a run with seed S uses `rollout_seed(S, t, p, s)`, a hash of the four
numbers; the engine's sampling keys are `fold_in(PRNGKey(seed), position)`. A sample therefore does not depend on
batch composition, process, or whether the run was resumed.

Packing: row i = [left padding | prompt | response | right padding] of width P + T (P the prompt width, T =
max_new_tokens), so every step has the same shapes and nothing recompiles. `mask` marks response positions;
`sampler_logp` holds the engine's log-probs (model distribution, fp32 head, T = 1) at those positions; with routing
replay, `routed_experts` the experts the engine routed every prompt and response token to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from m1jax.generation import Engine, GenerationResult
from m1jax.sampling import SamplingParams


def rollout_seed(run_seed: int, step: int, prompt_index: int, sample_index: int) -> int:
    """uint32 sampling seed of one sample: a SeedSequence hash of (run seed, step, prompt index, sample index)."""
    ss = np.random.SeedSequence([int(run_seed), int(step), int(prompt_index), int(sample_index)])
    return int(ss.generate_state(1, np.uint32)[0])


def sample_groups(engine: Engine, prompts: Sequence[Sequence[int]], group_size: int, base: SamplingParams, *,
                  run_seed: int, step: int, first_prompt_index: int = 0,
                  return_routed_experts: bool = False) -> list[GenerationResult]:
    """G = `group_size` samples of every prompt, prompt-major (row p·G + s is sample s of prompt p);
    `return_routed_experts`: each result carries its tokens' routed experts (for routing replay)."""
    rows, params = [], []
    for p, ids in enumerate(prompts):
        for s in range(group_size):
            rows.append(list(ids))
            params.append(dataclasses.replace(base, seed=rollout_seed(run_seed, step, first_prompt_index + p, s)))
    return engine.generate(rows, params, return_routed_experts=return_routed_experts)


@dataclasses.dataclass
class PackedRollouts:
    """Fixed-shape trainer arrays of N rollouts: tokens/valid/mask/sampler_logp `[N, P + T]`, lengths `[N]`, and
    when the results carry them the routed experts `[N, P + T, layers, k]` (−1 on padding: no expert)."""

    tokens_NxL: np.ndarray
    valid_NxL: np.ndarray
    mask_NxL: np.ndarray
    sampler_logp_NxL: np.ndarray
    response_len_N: np.ndarray
    routed_experts_NxLxNxK: np.ndarray | None = None


def prompt_width(prompt_lengths: Sequence[int], fixed: int | None = None) -> int:
    """P: the task's fixed prompt length if it has one, else the longest prompt rounded up to a power of two
    (few distinct shapes → few compiles)."""
    longest = max(prompt_lengths)
    if fixed is not None and longest <= fixed:
        return fixed
    return max(8, 1 << (longest - 1).bit_length())


def pack_rollouts(prompt_ids: Sequence[Sequence[int]], results: Sequence[GenerationResult], width_p: int,
                  max_new_tokens: int) -> PackedRollouts:
    """Left-pad each prompt to `width_p`, append its response, right-pad to `width_p + max_new_tokens`."""
    n, length = len(results), width_p + max_new_tokens
    tokens = np.zeros((n, length), np.int32)
    valid = np.zeros((n, length), bool)
    mask = np.zeros((n, length), np.float32)
    sampler = np.zeros((n, length), np.float32)
    lens = np.zeros((n,), np.int32)
    routed = None
    if n and getattr(results[0], "routed_experts", None) is not None:
        routed = np.full((n, length, *results[0].routed_experts.shape[1:]), -1, np.int32)
    for i, (p, r) in enumerate(zip(prompt_ids, results, strict=True)):
        if len(p) > width_p or len(r.tokens) > max_new_tokens:
            raise ValueError(f"rollout {i}: prompt {len(p)} / response {len(r.tokens)} tokens exceed the packed "
                             f"widths {width_p} / {max_new_tokens}")
        start = width_p - len(p)
        tokens[i, start:width_p] = p
        valid[i, start:width_p] = True
        t = len(r.tokens)
        tokens[i, width_p:width_p + t] = r.tokens
        valid[i, width_p:width_p + t] = True
        mask[i, width_p:width_p + t] = 1.0
        sampler[i, width_p:width_p + t] = r.logprobs
        lens[i] = t
        if routed is not None:  # the prompt's tokens, then the response's
            routed[i, start:width_p + t] = r.routed_experts
    return PackedRollouts(tokens, valid, mask, sampler, lens, routed)
