"""grpo_jax: GRPO post-training for language models in JAX / Flax NNX."""

__version__ = "0.1.0"
