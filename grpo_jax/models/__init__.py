"""Flax NNX decoder models (Llama / Qwen families)."""

from grpo_jax.models.transformer import ModelConfig, Transformer, positions_from_mask

__all__ = ["ModelConfig", "Transformer", "positions_from_mask"]
