"""The "reverse 3 digits" toy task: the CPU-sized end-to-end check of the CISPO trainer (spec: cispo.md).

Prompt `BOS d1 d2 d3 SEP`, target completion `d3 d2 d1 EOS`, on token ids:

    PAD=0  BOS=1  SEP=2  EOS=3  digit d -> 4 + d   (VOCAB_SIZE = 14)

(cispo.md calls this a "13-token vocabulary" but lists pad, BOS, SEP, EOS and 10 digits = 14 tokens; its
random-policy score of ~0.065 is the 14-token value, 0.0646, see `random_policy_expected_reward`.)

Reward of a completion c (tokens after the first EOS are ignored: generation stops there):

    R = digit_weight * (1/3) * #{k in 1..3 : c_k = target_k, before the first EOS} + eos_weight * [first EOS at k = 4]

with digit_weight = 0.8, eos_weight = 0.2.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAD, BOS, SEP, EOS = 0, 1, 2, 3
DIGIT_0 = 4
NUM_DIGITS = 10
VOCAB_SIZE = DIGIT_0 + NUM_DIGITS
PROMPT_LEN = 5  # BOS d1 d2 d3 SEP
TARGET_LEN = 4  # d3 d2 d1 EOS
DIGIT_WEIGHT, EOS_WEIGHT = 0.8, 0.2

_NAMES = {PAD: "<pad>", BOS: "<bos>", SEP: "<sep>", EOS: "<eos>"}


def digit_id(d):
    """Token id(s) of digit(s) d in 0..9."""
    return np.asarray(d) + DIGIT_0


def sample_prompts(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n uniform prompts: (prompt_ids [n, 5] int32 = BOS d1 d2 d3 SEP, digits [n, 3] int32)."""
    digits_Nx3 = rng.integers(0, NUM_DIGITS, size=(n, 3), dtype=np.int32)
    prompt_NxP = np.empty((n, PROMPT_LEN), np.int32)
    prompt_NxP[:, 0], prompt_NxP[:, 1:4], prompt_NxP[:, 4] = BOS, digit_id(digits_Nx3), SEP
    return prompt_NxP, digits_Nx3


def target_ids(prompt_ids) -> np.ndarray:
    """Target completion(s) d3 d2 d1 EOS for prompt(s) [..., 5] (left padding allowed)."""
    digits = _prompt_digits(np.atleast_2d(prompt_ids))
    target_NxC = np.concatenate([digits[:, ::-1], np.full((len(digits), 1), EOS, digits.dtype)], axis=1)
    return target_NxC if np.ndim(prompt_ids) == 2 else target_NxC[0]


def _prompt_digits(prompt_NxP: np.ndarray) -> np.ndarray:
    """Digit token ids [N, 3] of prompts whose last 5 tokens are BOS d d d SEP (anything before must be PAD)."""
    prompt_NxP = np.asarray(prompt_NxP)
    if prompt_NxP.ndim != 2 or prompt_NxP.shape[1] < PROMPT_LEN:
        raise ValueError(f"prompt_ids must be [N, >= {PROMPT_LEN}], got shape {prompt_NxP.shape}")
    tail = prompt_NxP[:, -PROMPT_LEN:]
    digits = tail[:, 1:4]
    ok = (tail[:, 0] == BOS) & (tail[:, 4] == SEP) & np.all((digits >= DIGIT_0) & (digits < VOCAB_SIZE), axis=1)
    ok &= np.all(prompt_NxP[:, :-PROMPT_LEN] == PAD, axis=1)
    if not np.all(ok):
        bad = int(np.flatnonzero(~ok)[0])
        raise ValueError(f"prompt {bad} is not [PAD...] BOS d d d SEP: {prompt_NxP[bad].tolist()}")
    return digits


def reverse3_rewards(
    prompt_ids,
    completion_ids,
    *,
    eos_id: int = EOS,
    digit_weight: float = DIGIT_WEIGHT,
    eos_weight: float = EOS_WEIGHT,
) -> np.ndarray:
    """Vectorized reward [N] (float32) of completions [N, C] (any C >= 0; shorter ones score what they have)."""
    digits_Nx3 = _prompt_digits(prompt_ids)
    comp_NxC = np.asarray(completion_ids)
    if comp_NxC.ndim != 2 or comp_NxC.shape[0] != digits_Nx3.shape[0]:
        raise ValueError(f"completion_ids must be [N={digits_Nx3.shape[0]}, C], got shape {comp_NxC.shape}")
    n, c = comp_NxC.shape
    padded_Nx4 = np.full((n, TARGET_LEN), -1, np.int64)
    padded_Nx4[:, : min(c, TARGET_LEN)] = comp_NxC[:, :TARGET_LEN]
    is_eos_NxC = comp_NxC == eos_id
    first_eos_N = np.where(is_eos_NxC.any(axis=1), is_eos_NxC.argmax(axis=1), c) if c else np.zeros(n, np.int64)
    before_eos_Nx3 = np.arange(3)[None, :] < first_eos_N[:, None]
    correct_Nx3 = (padded_Nx4[:, :3] == digits_Nx3[:, ::-1]) & before_eos_Nx3
    reward_N = digit_weight * correct_Nx3.mean(axis=1) + eos_weight * (first_eos_N == TARGET_LEN - 1)
    return reward_N.astype(np.float32)


def reverse3_reward_tokens(
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    *,
    eos_id: int = EOS,
    digit_weight: float = DIGIT_WEIGHT,
    eos_weight: float = EOS_WEIGHT,
) -> float:
    """Reward of one completion (module docstring): 0.8 * fraction of correct digit positions + 0.2 * [EOS 4th]."""
    prompt = np.asarray(prompt_ids)[None, :]
    completion = np.asarray(completion_ids, dtype=np.int64).reshape(1, -1)
    return float(reverse3_rewards(prompt, completion, eos_id=eos_id, digit_weight=digit_weight,
                                  eos_weight=eos_weight)[0])


def exact_match(prompt_ids, completion_ids, *, eos_id: int = EOS) -> np.ndarray:
    """[N] bool: the completion starts with d3 d2 d1 EOS (what follows the EOS is ignored)."""
    target_Nx4 = target_ids(prompt_ids).copy()
    target_Nx4[:, -1] = eos_id
    comp_NxC = np.asarray(completion_ids)
    if comp_NxC.shape[1] < TARGET_LEN:
        return np.zeros(comp_NxC.shape[0], bool)
    return np.all(comp_NxC[:, :TARGET_LEN] == target_Nx4, axis=1)


def random_policy_expected_reward(
    vocab_size: int = VOCAB_SIZE, digit_weight: float = DIGIT_WEIGHT, eos_weight: float = EOS_WEIGHT
) -> float:
    """E[R] for a policy sampling every token uniformly from the vocabulary until EOS.

    Position k (0-based) holds the right digit with probability q^k / V (no EOS before it, q = 1 - 1/V, then the
    one right token); the first EOS is 4th with probability q^3 / V. So
    E[R] = digit_weight * (1/3) * sum_{k<3} q^k / V + eos_weight * q^3 / V  (= 0.0646 for V = 14).
    """
    v = float(vocab_size)
    q = 1.0 - 1.0 / v
    return digit_weight * sum(q**k for k in range(3)) / (3.0 * v) + eos_weight * q**3 / v


def decode(ids: Sequence[int]) -> str:
    """Readable form of token ids, e.g. "<bos> 1 2 3 <sep>"."""
    return " ".join(_NAMES.get(int(t), str(int(t) - DIGIT_0) if DIGIT_0 <= t < VOCAB_SIZE else f"?{t}") for t in ids)
