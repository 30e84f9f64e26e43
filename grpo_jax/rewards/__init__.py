"""Reward functions: built-in rewards and the registry that resolves `reward_funcs`."""

from grpo_jax.rewards.builtin import (BUILTIN_REWARDS, CONFIGURED_REWARDS,
                                      SoftOverlongPunishment, completion_text,
                                      correctness_reward, extract_final_number, format_reward,
                                      soft_overlong_punishment)
from grpo_jax.rewards.registry import compute_rewards, resolve_reward_funcs

__all__ = [
    "BUILTIN_REWARDS",
    "CONFIGURED_REWARDS",
    "SoftOverlongPunishment",
    "completion_text",
    "compute_rewards",
    "correctness_reward",
    "extract_final_number",
    "format_reward",
    "resolve_reward_funcs",
    "soft_overlong_punishment",
]
