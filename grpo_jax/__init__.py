"""grpo_jax: GRPO post-training for language models in JAX / Flax NNX."""

from grpo_jax import startup as _startup

# Before any grpo_jax module imports TensorFlow, transformers or jax (see `startup`).
_startup.quiet_defaults()

__version__ = "0.1.0"
