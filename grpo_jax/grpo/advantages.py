"""Group-relative advantages (weighted rewards, NaN-aware group mean / std; GDPO's
per-function normalisation) and the reward metrics."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from grpo_jax import sampling
from grpo_jax.errors import ConfigError
from grpo_jax.grpo.types import MULTI_OBJECTIVE_AGGREGATIONS, SCALE_REWARDS, STD_EPS, _psum


def combine_rewards(rewards: jax.Array, weights) -> jax.Array:
  """[N, F] per-function rewards (NaN = not applicable) -> [N] weighted sum.

  NaN entries are skipped; a row where every function abstained stays NaN.
  """
  weighted = rewards * jnp.asarray(weights, rewards.dtype)
  any_valid = jnp.any(~jnp.isnan(rewards), axis=-1)
  return jnp.where(any_valid, jnp.nansum(weighted, axis=-1), jnp.nan)


# Values of magnitude below 2**UNSCALED_EXPONENT enter the statistics as they are; larger
# ones are first scaled down by a power of two (exact in IEEE arithmetic), so that squared
# deviations (< 2**100) and their sum over any realistic batch (< 2**28 rows) stay below
# float32's 2**128: rewards near 1e30 would otherwise give an infinite std, and every
# advantage 0.
UNSCALED_EXPONENT = 48


def _power_of_two_scale(x: jax.Array, valid: jax.Array, axis, axis_name=None) -> jax.Array:
  """2**-k (k >= 0, keepdims shape) bringing the largest valid |x| below 2**UNSCALED_EXPONENT.

  k = 0 (scale exactly 1) for ordinary values and for non-finite ones, so those give
  bitwise the results of the unscaled formula.
  """
  largest = jnp.max(jnp.where(valid, jnp.abs(x), 0.0), axis=axis, keepdims=True)
  if axis_name is not None:
    largest = jax.lax.pmax(largest, axis_name)
  _, exponent = jnp.frexp(largest)  # largest < 2**exponent
  shrink = jnp.where(jnp.isfinite(largest), jnp.maximum(exponent - UNSCALED_EXPONENT, 0), 0)
  # 2**-shrink built from its bits (shrink <= 128 - UNSCALED_EXPONENT: a normal float).
  scale = jax.lax.bitcast_convert_type((127 - shrink.astype(jnp.int32)) << 23, jnp.float32)
  return scale.astype(x.dtype)


def _scaled_mean_std(x: jax.Array, axis, axis_name=None):
  """(mean, std, scale): NaN-aware mean and Bessel std of `x * scale`, scale a power of two.

  The scale (see `_power_of_two_scale`) keeps every intermediate finite for any finite
  float32 input; dividing the results by it gives the statistics of `x` itself.
  Computed around a shift (the largest valid value) so that equal values give exactly
  mean = value and std = 0 in float32, whatever their magnitude: an all-equal group must
  get advantage 0, not float noise divided by 1e-4.
  """
  valid = ~jnp.isnan(x)
  scale = _power_of_two_scale(x, valid, axis, axis_name)
  x = x * scale
  shift = jnp.max(jnp.where(valid, x, -jnp.inf), axis=axis, keepdims=True)
  if axis_name is not None:
    shift = jax.lax.pmax(shift, axis_name)
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  dev = jnp.where(valid, x - shift, 0.0)
  count = _psum(jnp.sum(valid, axis=axis, keepdims=True), axis_name)
  mean_dev = _psum(jnp.sum(dev, axis=axis, keepdims=True), axis_name) / jnp.maximum(count, 1)
  sq_dev = _psum(jnp.sum(jnp.where(valid, (dev - mean_dev) ** 2, 0.0), axis=axis,
                         keepdims=True), axis_name)
  std = jnp.sqrt(sq_dev / jnp.maximum(count - 1, 1))
  return shift + mean_dev, jnp.where(count > 1, std, 0.0), scale


def _nan_mean_std(x: jax.Array, axis, axis_name=None):
  """NaN-aware mean and Bessel-corrected std along `axis` (and over devices), keepdims.

  Finite for any finite float32 input (the std only overflows when it exceeds float32's
  range itself); see `_scaled_mean_std`.
  """
  mean, std, scale = _scaled_mean_std(x, axis, axis_name)
  return mean / scale, std / scale


# TRL counts a std as zero with torch.isclose(std, 0): |std| <= atol (1e-8), rtol times 0.
ZERO_STD_ATOL = 1e-8


class Advantages(NamedTuple):
  advantages: jax.Array  # [N]; 0 for rows with no valid reward
  rewards: jax.Array  # [N] weighted total, NaN where no function applied
  group_std: jax.Array  # [N] std of the row's group of totals (Bessel), repeated per row
  # [N] the std TRL's advantage formula divides the row by (its `std_rewards`): the group
  # std (scale_rewards group, and none, which divides by nothing but still reports its
  # zero-std groups), the batch std of the totals (batch), the batch std of the aggregated
  # z-scores (normalize_then_sum). frac_reward_zero_std reads it.
  scale_std: jax.Array


def normalized_sum(rewards: jax.Array, weights, num_generations: int) -> jax.Array:
  """GDPO's aggregate: [N, F] -> [N], each function's rewards z-scored within the group
  ((r - mean) / (std + 1e-4), NaN-aware, Bessel), then their weighted NaN-skipping sum.

  A z-score is NaN exactly where its reward is, so a row where every function abstained
  stays NaN (as TRL's `unscorable_mask`); a function with fewer than two valid rewards in
  a group gives its valid one z-score 0 (TRL: NaN, skipped by the nansum: the same sum).
  """
  grouped = rewards.reshape(-1, num_generations, rewards.shape[-1])
  mean_scaled, std_scaled, scale = _scaled_mean_std(grouped, axis=1)
  z_scores = (grouped * scale - mean_scaled) / (std_scaled + STD_EPS * scale)
  return combine_rewards(z_scores.reshape(rewards.shape), weights)


def group_advantages(rewards: jax.Array, weights, num_generations: int,
                     scale_rewards: str = "group", axis_name: str | None = None,
                     multi_objective_aggregation: str = "sum_then_normalize") -> Advantages:
  """Group-relative advantages.

  rewards: [N, F] (N = prompts * G, rows of one prompt adjacent) or [N].
  sum_then_normalize (the weighted total r of each row): group: (r - mean_group) /
  (std_group + 1e-4); batch: the std over the whole global batch; none: r - mean_group.
  normalize_then_sum (GDPO): a = normalized_sum(rewards), then (a - mean) / (std + 1e-4)
  with mean and std over the whole global batch; scale_rewards does not apply (TRL).
  Global: over the devices of `axis_name` under pmap; under a mesh the arrays are global.
  """
  if rewards.ndim == 1:
    rewards = rewards[:, None]
  if rewards.shape[0] % num_generations:  # static shapes: raised while tracing
    raise ConfigError(f"a batch of {rewards.shape[0]} completions does not split into whole "
                      f"groups of num_generations={num_generations}")
  if scale_rewards not in SCALE_REWARDS:
    raise ConfigError(f"scale_rewards={scale_rewards!r}; allowed: {', '.join(SCALE_REWARDS)}")
  if multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
    raise ConfigError(f"multi_objective_aggregation={multi_objective_aggregation!r}; "
                      f"allowed: {', '.join(MULTI_OBJECTIVE_AGGREGATIONS)}")
  rewards = rewards.astype(jnp.float32)
  total = combine_rewards(rewards, weights)
  grouped = total.reshape(-1, num_generations)
  # The scaled statistics: (r - mean) / (std + eps) is computed as
  # (r*s - mean*s) / (std*s + eps*s) with s a power of two (1 for ordinary rewards), so
  # huge rewards neither overflow the difference nor the std.
  mean_scaled, std_scaled, scale = _scaled_mean_std(grouped, axis=1)
  mean, std = mean_scaled / scale, std_scaled / scale
  group_std = jnp.broadcast_to(std, grouped.shape).reshape(-1)
  if multi_objective_aggregation == "normalize_then_sum":
    aggregate = normalized_sum(rewards, weights, num_generations)
    batch_mean, batch_std, batch_scale = _scaled_mean_std(aggregate, axis=0,
                                                          axis_name=axis_name)
    centered = (aggregate * batch_scale - batch_mean) / (batch_std + STD_EPS * batch_scale)
    scale_std = jnp.broadcast_to(batch_std / batch_scale, total.shape)
  elif scale_rewards == "group":
    centered = (grouped * scale - mean_scaled) / (std_scaled + STD_EPS * scale)
    scale_std = group_std
  elif scale_rewards == "batch":
    _, batch_std, batch_scale = _scaled_mean_std(total, axis=0, axis_name=axis_name)
    centered = ((grouped * batch_scale - mean * batch_scale)
                / (batch_std + STD_EPS * batch_scale))
    scale_std = jnp.broadcast_to(batch_std / batch_scale, total.shape)
  else:  # none
    centered = grouped - mean
    scale_std = group_std
  advantages = jnp.nan_to_num(centered.reshape(-1), nan=0.0)
  return Advantages(advantages, total, group_std, scale_std)


def reward_metrics(rewards, adv: Advantages, rollout: sampling.Rollout, num_generations: int,
                   axis_name=None) -> dict[str, jax.Array]:
  """Global reward / completion statistics (TRL 1.x's names and definitions).

  reward, reward_std: NaN-aware mean and Bessel std of the weighted totals over the whole
  global batch; reward_std/group_mean: the mean over groups of the group std (what
  reward_std meant before TRL 1.x); frac_reward_zero_std: the fraction of rows whose
  `scale_std` is ~0 (TRL's isclose): with scale_rewards group or none the fraction of
  groups of zero std, with batch or normalize_then_sum 0 or 1 (one std for the batch).
  A std over fewer than two valid values is 0 here (TRL: NaN): a group with at most one
  scored completion has no learning signal and counts as zero std.
  """
  if rewards.ndim == 1:
    rewards = rewards[:, None]
  rewards = rewards.astype(jnp.float32)
  func_mean, func_std = _nan_mean_std(rewards, axis=0, axis_name=axis_name)
  reward_mean, reward_std = _nan_mean_std(adv.rewards, axis=0, axis_name=axis_name)
  # A mean over no valid value is NaN, not 0: "no function applied" must not read as a
  # real zero reward.
  counted = lambda x: _psum(jnp.sum(~jnp.isnan(x), axis=0), axis_name) > 0
  func_mean = jnp.where(counted(rewards), func_mean[0], jnp.nan)
  reward_mean = jnp.where(counted(adv.rewards), reward_mean[0], jnp.nan)
  group_std = adv.group_std.reshape(-1, num_generations)[:, 0]
  num_groups = _psum(jnp.float32(group_std.shape[0]), axis_name)
  lengths = sampling.model_token_mask(rollout).sum(-1).astype(jnp.float32)  # no tool tokens
  rows = _psum(jnp.float32(lengths.shape[0]), axis_name)
  zero_std = jnp.abs(adv.scale_std) <= ZERO_STD_ATOL
  return {
      "reward": reward_mean,
      "reward_std": reward_std[0],
      "reward_std/group_mean": _psum(group_std.sum(), axis_name) / num_groups,
      "frac_reward_zero_std": _psum(jnp.sum(zero_std), axis_name) / rows,
      "rewards_per_func/mean": func_mean,
      "rewards_per_func/std": func_std[0],
      "completions/mean_length": _psum(lengths.sum(), axis_name) / rows,
      "completions/clipped_ratio":
          _psum(jnp.sum(~rollout.eos_terminated), axis_name) / rows,
  }
