"""The config as the pure step's static settings (`grpo.GRPOConfig`, its sampling), and what
a run holds beside the actor."""

from __future__ import annotations

from grpo_jax import grpo, sampling
from grpo_jax.errors import ConfigError
from grpo_jax.models import lora


def reward_func_specs(config) -> list[str]:
  specs = config.reward_funcs
  if isinstance(specs, str):
    specs = specs.split(",")
  return [s.strip() for s in specs if s.strip()]


def sampling_config(config, eos_token_ids, pad_token_id, stop_token_ids=()
                    ) -> sampling.SamplingConfig:
  return sampling.SamplingConfig(
      max_completion_length=config.max_completion_length, eos_token_ids=tuple(eos_token_ids),
      pad_token_id=pad_token_id, num_generations=config.num_generations,
      temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
      stop_token_ids=tuple(stop_token_ids))


def grpo_config(config, eos_token_ids, pad_token_id, stop_token_ids=()) -> grpo.GRPOConfig:
  """The step's static config as the config gives it (`micro_batch_size=0` and
  `remat=None` are then the whole batch and off: the memory plan, `grpo_jax.memory`,
  chooses them before anything is compiled); `stop_token_ids`: where multi-turn decoding
  also pauses a row (a tool call's end)."""
  weights = config.reward_weights
  if weights is not None and not all(isinstance(w, (int, float)) for w in weights):
    raise ConfigError(f"config.reward_weights={weights!r}; allowed: a tuple of numbers, "
                      "one per reward function, e.g. '(1.0, 0.5)'")
  return grpo.GRPOConfig(
      sampling=sampling_config(config, eos_token_ids, pad_token_id, stop_token_ids),
      beta=config.beta, epsilon=config.epsilon, epsilon_high=config.epsilon_high,
      loss_type=config.loss_type, scale_rewards=config.scale_rewards,
      reward_weights=None if weights is None else tuple(float(w) for w in weights),
      num_reward_funcs=len(reward_func_specs(config)), num_iterations=config.num_iterations,
      use_bias_correction_kl=config.use_bias_correction_kl,
      importance_sampling_level=config.importance_sampling_level, delta=config.delta,
      sapo_temperature_pos=config.sapo_temperature_pos,
      sapo_temperature_neg=config.sapo_temperature_neg,
      top_entropy_quantile=config.top_entropy_quantile,
      mask_truncated_completions=config.mask_truncated_completions,
      multi_objective_aggregation=config.multi_objective_aggregation,
      logprob_chunk_size=config.logprob_chunk_size, micro_batch_size=config.micro_batch_size,
      remat=bool(config.remat), dropout_seed=config.seed if lora_dropout(config) else None)


def keeps_reference(config) -> bool:
  """Whether a run holds a frozen reference beside the actor: for its log-probs (beta > 0)
  or to sync it toward the actor (sync_ref_model). Otherwise none is placed, saved or
  restored. (LoRA's reference is its frozen base, which it holds in any case.)"""
  return config.beta > 0 or bool(config.sync_ref_model)


def lora_dropout(config) -> bool:
  """Whether the train pass draws LoRA dropout masks."""
  adapters = lora.from_config(config.lora)
  return adapters is not None and adapters.dropout > 0
