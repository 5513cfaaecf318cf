"""m1jax training: CISPO / GRPO-clip losses, group advantages, reward functions, toy tasks, and the trainers
(`CISPOTrainer`, `SFTTrainer`; entry point `m1jax train cispo|sft --config FILE`, schema in `m1jax.train.run_config`).

Host-side pieces (advantages, rewards, sandbox, tasks) are numpy/stdlib; the losses are jit-compatible JAX. The
trainers (and their model/orbax imports) load lazily on first attribute access.
"""

from m1jax.train.advantages import dynamic_sampling_filter, group_advantages
from m1jax.train.losses import (
    aggregate_token_terms,
    cispo_loss,
    cispo_loss_and_metrics,
    grpo_clip_loss,
    grpo_clip_loss_and_metrics,
    token_normalizer,
)
from m1jax.train.rewards import (
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
from m1jax.train.run_config import RunConfig, RunConfigError, load_run_config, parse_run_config
from m1jax.train.sandbox import SandboxLimits

_LAZY = {
    "CISPOTrainer": "m1jax.train.cispo_trainer",
    "SFTTrainer": "m1jax.train.sft_trainer",
    "sequence_logprobs": "m1jax.train.logprobs",
    "update_step": "m1jax.train.update",
    "make_optimizer": "m1jax.train.optim",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'train' has no attribute {name!r}")


__all__ = [
    "CISPOTrainer",
    "RewardFunctionError",
    "RewardScores",
    "RewardSet",
    "RunConfig",
    "RunConfigError",
    "SFTTrainer",
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
    "load_run_config",
    "make_optimizer",
    "make_code_reward",
    "math_answer_reward",
    "parse_run_config",
    "sequence_logprobs",
    "think_format_reward",
    "token_normalizer",
    "update_step",
]
