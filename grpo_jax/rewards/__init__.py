"""Reward functions: built-in rewards and the registry that resolves `reward_funcs`."""

from grpo_jax.rewards.builtin import (BUILTIN_REWARDS, CONFIGURED_REWARDS,
                                      SoftOverlongPunishment,
                                      correctness_reward, extract_final_number, format_reward,
                                      soft_overlong_punishment)
from grpo_jax.rewards.registry import compute_rewards, resolve_reward_funcs
from grpo_jax.rewards.text import completion_text
from grpo_jax.rewards.sandbox import (ExecutionResult, SandboxLimits, code_execution_reward,
                                      run_tests)

__all__ = [
    "BUILTIN_REWARDS",
    "CONFIGURED_REWARDS",
    "ExecutionResult",
    "SandboxLimits",
    "SoftOverlongPunishment",
    "code_execution_reward",
    "completion_text",
    "compute_rewards",
    "correctness_reward",
    "extract_final_number",
    "format_reward",
    "resolve_reward_funcs",
    "run_tests",
    "soft_overlong_punishment",
]
