"""Flax NNX decoder models (Llama / Qwen families) and Hugging Face checkpoint load/save."""

from grpo_jax.models.hf import config_from_hf, from_pretrained, save_pretrained
from grpo_jax.models.transformer import ModelConfig, Transformer, positions_from_mask

__all__ = ["ModelConfig", "Transformer", "positions_from_mask", "config_from_hf",
           "from_pretrained", "save_pretrained"]
