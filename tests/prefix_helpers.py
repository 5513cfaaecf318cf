"""Shared by the prefix-cache and state-store tests: block and cache sizes, greedy sampling, random prompts and the
bit-exact comparison of two `run` results (result, cached tokens, next-token logits)."""

import numpy as np

from m1jax.sampling import SamplingParams

BLOCK, CAPACITY = 16, 256
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=(), repetition_stop=None)


def tokens(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 500, n).tolist()


def assert_same(a, b):
    (ra, _, la), (rb, _, lb) = a, b
    assert ra.tokens == rb.tokens
    assert ra.logprobs == rb.logprobs  # exactly: the same calls on the same inputs
    assert np.array_equal(la, lb)
