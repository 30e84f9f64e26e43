"""GRPO's static settings (`GRPOConfig`), the train state, and the device-axis sum."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import optax
from flax import nnx

from grpo_jax.sampling import SamplingConfig
from grpo_jax.errors import ConfigError

CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


class LossType(NamedTuple):
  """What a `loss_type` is made of (TRL 1.16's `_compute_loss`), each part one rule in
  `grpo.loss`: its policy term per token, how token losses become the loss, and the clip
  metrics it reports."""

  policy: str  # "clipped" (PPO's surrogate), "cispo" (capped ratio, unclipped), "sapo" (gate)
  # sequence_mean: each row's token mean, averaged over rows; shard_token_mean: per device
  # (process, in TRL), over its tokens; fixed_length: over rows x max_completion_length;
  # token_mean: over the batch's tokens
  aggregation: str
  clip_metrics: tuple[str, ...]


LOSS_TABLE = {
    "grpo": LossType("clipped", "sequence_mean", CLIP_METRICS),
    "bnpo": LossType("clipped", "shard_token_mean", CLIP_METRICS),
    "dr_grpo": LossType("clipped", "fixed_length", CLIP_METRICS),
    "dapo": LossType("clipped", "token_mean", CLIP_METRICS),
    "cispo": LossType("cispo", "token_mean", ("cispo_clip_ratio",)),
    "sapo": LossType("sapo", "sequence_mean", ()),
}
LOSS_TYPES = tuple(LOSS_TABLE)
SCALE_REWARDS = ("group", "batch", "none")
# token: one ratio per token; sequence: GSPO, one ratio per completion (the exp of the masked
# mean of its tokens' log-ratios); sequence_token: GSPO-token, the sequence ratio's value
# with each token's own gradient.
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_token")
# sum_then_normalize: weighted sum of the reward functions, then group statistics;
# normalize_then_sum: GDPO, each function z-scored in its group, weighted sum, batch z-score.
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
STD_EPS = 1e-4


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Static hyperparameters of one GRPO step. Validated on construction."""

  sampling: SamplingConfig
  beta: float = 0.04
  epsilon: float = 0.2
  epsilon_high: float | None = None  # None: same as epsilon
  loss_type: str = "grpo"
  scale_rewards: str = "group"
  reward_weights: tuple[float, ...] | None = None  # None: every reward function weighs 1
  num_reward_funcs: int = 1
  num_iterations: int = 1  # optimizer updates per sampled batch (GRPO's mu)
  # The variants (TRL 1.x names and defaults, except use_bias_correction_kl; see config.py).
  use_bias_correction_kl: bool = False  # KL per token times the importance ratio
  importance_sampling_level: str = "token"
  delta: float | None = None  # two-sided clipping: the unclipped branch capped at delta
  sapo_temperature_pos: float = 1.0
  sapo_temperature_neg: float = 1.05
  top_entropy_quantile: float = 1.0  # policy loss on the top-rho tokens by entropy only
  mask_truncated_completions: bool = False  # completions without EOS: out of the loss
  multi_objective_aggregation: str = "sum_then_normalize"
  logprob_chunk_size: int = 0  # vocabulary entries per log-prob chunk; 0: auto
  # Completions per forward/backward pass of the train step on each device (gradients
  # are accumulated over the micro-batches); 0: the whole batch at once. The trainer's
  # memory plan (`grpo_jax.memory`) chooses it where the config leaves it at 0.
  micro_batch_size: int = 0
  # The train pass recomputes each layer in its backward pass instead of saving its
  # activations (one more forward pass, a fraction of the memory).
  remat: bool = False
  # Completions per no-grad pass of the score step (old and reference log-probs) on each
  # device; 0: the whole batch at once. Chosen by the memory plan (`grpo_jax.memory`).
  score_micro_batch_size: int = 0
  # How many ways the token rows of a batch are split over devices inside one program:
  # 1 under pmap and on one device (each program sees its own rows), data x fsdp in mesh
  # mode (the program sees the global batch). Per-device sizes (log-prob chunks,
  # micro-batches) are taken from one shard's rows.
  token_shards: int = 1
  # LoRA dropout in the train pass: its masks draw from fold_in(key(dropout_seed), update
  # count) (and the device, micro-batch, layer, projection), so a resume redraws the same
  # ones; None: no dropout key (models without LoRA dropout).
  dropout_seed: int | None = None

  def __post_init__(self):
    if self.sampling.num_generations < 2:
      raise ConfigError(
          f"num_generations={self.sampling.num_generations}; must be >= 2 (GRPO compares "
          "each answer with its siblings)")
    if self.loss_type not in LOSS_TYPES:
      raise ConfigError(f"loss_type={self.loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")
    if self.scale_rewards not in SCALE_REWARDS:
      raise ConfigError(
          f"scale_rewards={self.scale_rewards!r}; allowed: {', '.join(SCALE_REWARDS)}")
    if self.epsilon <= 0:
      raise ConfigError(f"epsilon={self.epsilon}; must be > 0")
    if self.epsilon_high is not None and self.epsilon_high <= 0:
      raise ConfigError(f"epsilon_high={self.epsilon_high}; must be > 0 (or None)")
    if self.beta < 0:
      raise ConfigError(f"beta={self.beta}; must be >= 0")
    if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
      raise ConfigError(f"importance_sampling_level={self.importance_sampling_level!r}; "
                        f"allowed: {', '.join(IMPORTANCE_SAMPLING_LEVELS)}")
    if self.multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
      raise ConfigError(f"multi_objective_aggregation={self.multi_objective_aggregation!r}; "
                        f"allowed: {', '.join(MULTI_OBJECTIVE_AGGREGATIONS)}")
    if self.delta is not None and self.delta <= 0:
      raise ConfigError(f"delta={self.delta}; must be > 0 (or None: no two-sided clipping); "
                        "INTELLECT-2 recommends a value above 1 + epsilon_high")
    for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"{name}={getattr(self, name)}; must be > 0")
    if not 0.0 <= self.top_entropy_quantile <= 1.0:
      raise ConfigError(f"top_entropy_quantile={self.top_entropy_quantile}; allowed: 0 <= x <= 1 "
                        "(1: every token; 0.2: the paper's top 20%)")
    if self.num_iterations < 1:
      raise ConfigError(f"num_iterations={self.num_iterations}; must be >= 1")
    if self.num_reward_funcs < 1:
      raise ConfigError(f"num_reward_funcs={self.num_reward_funcs}; must be >= 1")
    if self.reward_weights is not None and len(self.reward_weights) != self.num_reward_funcs:
      raise ConfigError(
          f"reward_weights has {len(self.reward_weights)} entries but there are "
          f"{self.num_reward_funcs} reward functions; give one weight per function")
    if self.micro_batch_size < 0:
      raise ConfigError(f"micro_batch_size={self.micro_batch_size}; must be >= 0 "
                        "(0: the whole batch)")
    if self.score_micro_batch_size < 0:
      raise ConfigError(f"score_micro_batch_size={self.score_micro_batch_size}; must be >= 0 "
                        "(0: the whole batch)")
    if self.logprob_chunk_size < 0:
      raise ConfigError(f"logprob_chunk_size={self.logprob_chunk_size}; must be >= 0 "
                        "(0: sized from the vocabulary)")

  @property
  def num_generations(self) -> int:
    return self.sampling.num_generations

  @property
  def temperature(self) -> float:
    return self.sampling.logprob_temperature

  @property
  def upper_epsilon(self) -> float:
    """epsilon_high, or epsilon where it is None (TRL's `self.epsilon_high`). cispo caps
    its ratio at this value itself (ScaleRL's eps_max, e.g. 5.0), not at 1 + it."""
    return self.epsilon if self.epsilon_high is None else self.epsilon_high

  @property
  def clip_range(self) -> tuple[float, float]:
    return 1.0 - self.epsilon, 1.0 + self.upper_epsilon

  @property
  def weights(self) -> tuple[float, ...]:
    return self.reward_weights or (1.0,) * self.num_reward_funcs


class TrainState(NamedTuple):
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)
