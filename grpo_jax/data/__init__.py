"""Prompt datasets: the embedded demo task, local files and hub datasets, and batching."""

from grpo_jax.data.batching import PromptStream, encode_prompts
from grpo_jax.data.demo import (build_demo_tokenizer, demonstration, make_arithmetic_splits,
                                reasoning_completion)
from grpo_jax.data.loading import load_prompt_dataset

__all__ = [
    "PromptStream",
    "build_demo_tokenizer",
    "demonstration",
    "encode_prompts",
    "load_prompt_dataset",
    "make_arithmetic_splits",
    "reasoning_completion",
]
