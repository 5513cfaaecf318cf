"""GRPO group advantages and DAPO dynamic sampling (host-side numpy, once per rollout batch).

For rows i with rewards R_i and prompt groups g(i):

    A_i = (R_i - mean_{j in g(i)} R_j) / (s + eps)

with s = std_{j in g(i)} R_j (std="group", GRPO / MiniMax-M1 Eq. 2), s = std over the whole batch
(std="batch"), or no scaling A_i = R_i - mean_g R (std=None, Dr. GRPO). Standard deviations use `ddof`
(default 0, the population std; TRL and verl use torch's unbiased std, i.e. ddof=1).

A group whose rewards are all exactly equal (including a group of one) has zero variance: its advantage is
exactly 0 (not a rounding residue divided by eps), it is counted in `info`, and `dynamic_sampling_filter` drops it.
Arithmetic is float64; advantages are returned as float32.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

StdMode = Literal["group", "batch"] | None
STD_MODES = ("group", "batch", None)


def _validate(rewards, group_ids) -> tuple[np.ndarray, np.ndarray]:
    rewards_N = np.asarray(rewards, dtype=np.float64)
    group_ids_N = np.asarray(group_ids)
    if rewards_N.ndim != 1:
        raise ValueError(f"rewards must be 1-D [num_samples], got shape {rewards_N.shape}")
    if group_ids_N.shape != rewards_N.shape:
        raise ValueError(f"group_ids must have the shape of rewards {rewards_N.shape}, got {group_ids_N.shape}")
    if rewards_N.size and not np.issubdtype(group_ids_N.dtype, np.integer):
        raise ValueError(f"group_ids must be integers, got dtype {group_ids_N.dtype}")
    if not np.all(np.isfinite(rewards_N)):
        bad = np.flatnonzero(~np.isfinite(rewards_N))
        raise ValueError(f"rewards must be finite; rows {bad[:10].tolist()} are {rewards_N[bad[:10]].tolist()}")
    return rewards_N, group_ids_N


def _group_index(group_ids_N: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense group index in [0, G) for arbitrary integer ids (order of first sorted id)."""
    _, seg_N = np.unique(group_ids_N, return_inverse=True)
    seg_N = seg_N.reshape(-1)
    return seg_N, int(seg_N.max()) + 1 if seg_N.size else 0


def zero_std_groups(rewards, group_ids) -> tuple[np.ndarray, np.ndarray]:
    """(seg_N, zero_G): dense group index of every row and, per group, whether all its rewards are equal."""
    rewards_N, group_ids_N = _validate(rewards, group_ids)
    seg_N, G = _group_index(group_ids_N)
    max_G = np.full(G, -np.inf)
    min_G = np.full(G, np.inf)
    np.maximum.at(max_G, seg_N, rewards_N)
    np.minimum.at(min_G, seg_N, rewards_N)
    return seg_N, max_G == min_G


def group_advantages(
    rewards,
    group_ids,
    *,
    std: StdMode = "group",
    eps: float = 1e-6,
    ddof: int = 0,
) -> tuple[np.ndarray, dict]:
    """Group-relative advantages A [N] (float32) and batch statistics.

    A_i = (R_i - mean_g R) / (s + eps), s per `std` (see module docstring); zero-variance groups give A = 0.
    info: num_groups, num_zero_std_groups, frac_zero_std, reward_mean, reward_std (batch, ddof=0).
    """
    if std not in STD_MODES:
        raise ValueError(f"std must be one of {STD_MODES}, got {std!r}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    rewards_N, group_ids_N = _validate(rewards, group_ids)
    seg_N, zero_G = zero_std_groups(rewards_N, group_ids_N)
    G = zero_G.size
    count_G = np.bincount(seg_N, minlength=G).astype(np.float64)
    mean_G = np.bincount(seg_N, weights=rewards_N, minlength=G) / np.maximum(count_G, 1.0)
    centered_N = rewards_N - mean_G[seg_N]
    centered_N[zero_G[seg_N]] = 0.0
    if std is None:
        adv_N = centered_N
    else:
        if std == "group":
            sq_G = np.bincount(seg_N, weights=centered_N**2, minlength=G)
            scale_N = np.sqrt(sq_G / np.maximum(count_G - ddof, 1.0))[seg_N] + eps
        else:
            scale_N = np.full_like(centered_N, (np.std(rewards_N, ddof=ddof) if rewards_N.size > ddof else 0.0) + eps)
        # scale is 0 only if eps == 0 on zero-variance rows, whose advantage is defined as 0.
        adv_N = np.divide(centered_N, scale_N, out=np.zeros_like(centered_N), where=scale_N > 0)
    num_zero = int(np.sum(zero_G))
    info = {
        "num_groups": G,
        "num_zero_std_groups": num_zero,
        "frac_zero_std": num_zero / G if G else 0.0,
        "reward_mean": float(np.mean(rewards_N)) if rewards_N.size else 0.0,
        "reward_std": float(np.std(rewards_N)) if rewards_N.size else 0.0,
    }
    return adv_N.astype(np.float32), info


def dynamic_sampling_filter(rewards, group_ids) -> np.ndarray:
    """DAPO dynamic sampling: indices (ascending, int64) of the rows whose group has non-equal rewards.

    Groups whose rewards are all equal carry zero advantage, hence zero policy gradient; dropping them keeps
    the effective batch informative (refill the batch by sampling more prompts).
    """
    seg_N, zero_G = zero_std_groups(rewards, group_ids)
    return np.flatnonzero(~zero_G[seg_N]).astype(np.int64)
