"""m1jax RL training: CISPO / GRPO-clip losses, group advantages, reward functions, toy tasks.

Host-side pieces (advantages, rewards, sandbox, tasks) are numpy/stdlib; the losses are jit-compatible JAX.
"""

from train.advantages import dynamic_sampling_filter, group_advantages
from train.losses import (
    aggregate_token_terms,
    cispo_loss,
    cispo_loss_and_metrics,
    grpo_clip_loss,
    grpo_clip_loss_and_metrics,
    token_normalizer,
)
from train.rewards import (
    RewardFunctionError,
    RewardScores,
    RewardSet,
    code_reward,
    combine_rewards,
    extract_code,
    extract_math_answer,
    make_code_reward,
    math_answer_reward,
    think_format_reward,
)
from train.sandbox import SandboxLimits

__all__ = [
    "RewardFunctionError",
    "RewardScores",
    "RewardSet",
    "SandboxLimits",
    "aggregate_token_terms",
    "cispo_loss",
    "cispo_loss_and_metrics",
    "code_reward",
    "combine_rewards",
    "dynamic_sampling_filter",
    "extract_code",
    "extract_math_answer",
    "group_advantages",
    "grpo_clip_loss",
    "grpo_clip_loss_and_metrics",
    "make_code_reward",
    "math_answer_reward",
    "think_format_reward",
    "token_normalizer",
]
