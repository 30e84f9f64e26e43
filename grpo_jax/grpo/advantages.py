"""Group-relative advantages: weighted rewards, NaN-aware group mean / std."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from grpo_jax.errors import ConfigError
from grpo_jax.grpo.types import SCALE_REWARDS, STD_EPS, _psum


def combine_rewards(rewards: jax.Array, weights) -> jax.Array:
  """[N, F] per-function rewards (NaN = not applicable) -> [N] weighted sum.

  NaN entries are skipped; a row where every function abstained stays NaN.
  """
  weighted = rewards * jnp.asarray(weights, rewards.dtype)
  any_valid = jnp.any(~jnp.isnan(rewards), axis=-1)
  return jnp.where(any_valid, jnp.nansum(weighted, axis=-1), jnp.nan)


def _nan_mean_std(x: jax.Array, axis, axis_name=None):
  """NaN-aware mean and Bessel-corrected std along `axis` (and over devices).

  Computed around a shift (the largest valid value) so that equal values give exactly
  mean = value and std = 0 in float32, whatever their magnitude: an all-equal group must
  get advantage 0, not float noise divided by 1e-4.
  """
  valid = ~jnp.isnan(x)
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
  return shift + mean_dev, jnp.where(count > 1, std, 0.0)


class Advantages(NamedTuple):
  advantages: jax.Array  # [N]; 0 for rows with no valid reward
  rewards: jax.Array  # [N] weighted total, NaN where no function applied
  group_std: jax.Array  # [N] std of the row's group (Bessel), repeated per row


def group_advantages(rewards: jax.Array, weights, num_generations: int,
                     scale_rewards: str = "group", axis_name: str | None = None) -> Advantages:
  """Group-relative advantages.

  rewards: [N, F] (N = prompts * G, rows of one prompt adjacent) or [N].
  group: (r - mean_group) / (std_group + 1e-4); batch: the std over the whole global
  batch; none: r - mean_group.
  """
  if rewards.ndim == 1:
    rewards = rewards[:, None]
  if rewards.shape[0] % num_generations:  # static shapes: raised while tracing
    raise ConfigError(f"a batch of {rewards.shape[0]} completions does not split into whole "
                      f"groups of num_generations={num_generations}")
  total = combine_rewards(rewards.astype(jnp.float32), weights)
  grouped = total.reshape(-1, num_generations)
  mean, std = _nan_mean_std(grouped, axis=1)
  centered = grouped - mean
  if scale_rewards == "group":
    centered = centered / (std + STD_EPS)
  elif scale_rewards == "batch":
    _, batch_std = _nan_mean_std(total, axis=0, axis_name=axis_name)
    centered = centered / (batch_std + STD_EPS)
  elif scale_rewards != "none":
    raise ConfigError(f"scale_rewards={scale_rewards!r}; allowed: {', '.join(SCALE_REWARDS)}")
  advantages = jnp.nan_to_num(centered.reshape(-1), nan=0.0)
  group_std = jnp.broadcast_to(std, grouped.shape).reshape(-1)
  return Advantages(advantages, total, group_std)
