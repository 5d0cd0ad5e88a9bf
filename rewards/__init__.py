"""Reward functions for GRPO (TRL signature), their registry and the weighted combiner.

Importing the package registers the built-in rewards: ``math``, ``exact_match``, ``format``,
``length_penalty``, ``reasoning_gym``, ``code`` and ``reward_model``. Heavy dependencies
(math-verify, reasoning-gym, transformers models) load on first use. See
:mod:`rewards.registry` for the recipe format and :mod:`rewards.sandbox` for code execution.
"""

from rewards import accuracy, code_exec, gym, reward_model, style
from rewards.registry import (
    RewardConfigError,
    WeightedReward,
    as_messages,
    build_rewards,
    combine_scores,
    completion_text,
    prompt_text,
    register,
    registered,
    reward_metrics,
    score,
    trl_reward_funcs,
)

__all__ = [
    "RewardConfigError",
    "WeightedReward",
    "accuracy",
    "as_messages",
    "build_rewards",
    "code_exec",
    "combine_scores",
    "completion_text",
    "gym",
    "prompt_text",
    "register",
    "registered",
    "reward_metrics",
    "reward_model",
    "score",
    "style",
    "trl_reward_funcs",
]
