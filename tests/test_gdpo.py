"""Advantages (GDPO's normalize_then_sum and sum_then_normalize) and the reward metrics
against a float64 NumPy transcription of TRL 1.16 (GRPOTrainer._generate_and_score_completions,
trl.trainer.utils.nanstd): on one device, under pmap over 4 devices and under jit of global
arrays sharded as mesh mode shards them.

One documented difference: a std over fewer than two valid values is NaN in TRL and 0 here.
Advantages agree regardless (TRL's NaN becomes 0 through nan_to_num or nansum exactly where
ours is 0); for the zero-std flag and reward_std the transcription applies our convention.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grpo_jax import grpo, sampling
from grpo_jax.errors import ConfigError

G = 4
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
MODES = [(scale, "sum_then_normalize") for scale in grpo.SCALE_REWARDS] + [
    ("group", "normalize_then_sum"), ("batch", "normalize_then_sum")]


# ---------------------------------------------------------------- TRL, in NumPy float64

def nanmean(x, axis=None, keepdims=False):
  with warnings.catch_warnings():  # all-NaN slices: NaN, as torch.nanmean
    warnings.simplefilter("ignore", RuntimeWarning)
    return np.nanmean(x, axis=axis, keepdims=keepdims)


def trl_nanstd(x, axis=None, keepdims=False):
  """trl.trainer.utils.nanstd: NaN-aware, Bessel-corrected, NaN for fewer than 2 values."""
  mean = nanmean(x, axis=axis, keepdims=True)
  variance = nanmean((x - mean) ** 2, axis=axis, keepdims=True)
  count = np.sum(~np.isnan(x), axis=axis, keepdims=True)
  with np.errstate(divide="ignore", invalid="ignore"):
    correction = np.where(count > 1, count / (count - 1), np.nan)
  std = np.sqrt(variance * correction)
  return std if keepdims else (std.reshape(()) if axis is None else np.squeeze(std, axis))


def trl_advantages(rewards_per_func, weights, g, scale_rewards, aggregation):
  """(advantages, std_rewards) of TRL 1.16, line for line."""
  r = np.asarray(rewards_per_func, np.float64)
  w = np.asarray(weights, np.float64)
  unscorable = np.isnan(r).all(axis=1)
  with np.errstate(invalid="ignore"):
    if aggregation == "sum_then_normalize":
      rewards = np.nansum(r * w[None], axis=1)
      rewards[unscorable] = np.nan
      mean_grouped = np.repeat(nanmean(rewards.reshape(-1, g), axis=1), g)
      if scale_rewards in ("group", "none"):
        std_rewards = np.repeat(trl_nanstd(rewards.reshape(-1, g), axis=1), g)
      else:
        std_rewards = np.broadcast_to(trl_nanstd(rewards), rewards.shape)
      advantages = rewards - mean_grouped
      if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    else:
      grouped = r.reshape(-1, g, r.shape[1])
      mean_k = nanmean(grouped, axis=1, keepdims=True)
      std_k = trl_nanstd(grouped, axis=1, keepdims=True)
      reward_k = ((grouped - mean_k) / (std_k + 1e-4)).reshape(-1, r.shape[1])
      rewards = np.nansum(reward_k * w[None], axis=1)
      rewards[unscorable] = np.nan
      std_rewards = np.broadcast_to(trl_nanstd(rewards), rewards.shape)
      advantages = (rewards - nanmean(rewards)) / (std_rewards + 1e-4)
  return np.nan_to_num(advantages, nan=0.0), std_rewards


def trl_metrics(rewards_per_func, weights, g, scale_rewards, aggregation):
  r = np.asarray(rewards_per_func, np.float64)
  rewards = np.nansum(r * np.asarray(weights, np.float64)[None], axis=1)
  rewards[np.isnan(r).all(axis=1)] = np.nan
  _, std_rewards = trl_advantages(r, weights, g, scale_rewards, aggregation)
  # Ours: a std of fewer than two values is 0 (so zero std), where TRL's is NaN.
  std_rewards = np.nan_to_num(std_rewards, nan=0.0)
  group_std = np.nan_to_num(trl_nanstd(rewards.reshape(-1, g), axis=1), nan=0.0)
  return {
      "reward": nanmean(rewards),
      "reward_std": np.nan_to_num(trl_nanstd(rewards), nan=0.0),
      "reward_std/group_mean": group_std.mean(),
      "frac_reward_zero_std": np.isclose(std_rewards, 0.0, rtol=1e-5, atol=1e-8).mean(),
  }


# ---------------------------------------------------------------------------- cases

def mixed_case():
  """8 groups of 4, 3 functions: NaNs at random (ragged validity), a group whose rewards
  are all equal, an unscorable row, a function valid once in a group, an all-NaN group,
  and a function on another scale."""
  rng = np.random.default_rng(0)
  r = rng.normal(size=(8, G, 3))
  r[..., 2] *= 50.0
  r[rng.random(r.shape) < 0.2] = np.nan
  r[0] = [[1.0, 2.0, 3.0]] * G  # every function equal within the group
  r[1, 2] = np.nan  # a row no function scored
  r[2, 1:, 1] = np.nan  # function 1 valid once in this group
  r[3] = np.nan  # nothing scored in this group
  r[4, :, 0] = [0.0, 1.0, 1.0, 0.0]
  return r.reshape(-1, 3).astype(np.float32), (1.0, 0.5, 2.0)


def binary_case():
  """Correctness and format rewards in {0, 1}; groups all right, all wrong, mixed."""
  correct = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0],
                      [0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1], [0, 1, 0, 0]], np.float32)
  fmt = np.array([[1, 1, 1, 1], [1, 0, 1, 0], [1, 1, 1, 1], [0, 1, 0, 1],
                  [0, 0, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1], [1, 1, 1, 1]], np.float32)
  return np.stack([correct.reshape(-1), fmt.reshape(-1)], -1), (1.0, 0.5)


def zero_weight_case():
  """A function of weight 0 with all-NaN gaps: it must not move anything."""
  r, _ = binary_case()
  noise = np.random.default_rng(1).normal(size=(len(r), 1)).astype(np.float32)
  noise[::3] = np.nan
  return np.concatenate([r, noise], -1), (1.0, 0.5, 0.0)


def huge_case():
  """One function near 1e30 beside a {0, 1} one: the power-of-two scaling keeps every
  statistic finite (unscaled, squared deviations overflow float32)."""
  r, w = binary_case()
  big = np.random.default_rng(2).normal(size=(len(r), 1)) * 1e30
  return np.concatenate([r, np.float32(big)], -1), (*w, 1.0)


CASES = {"mixed": mixed_case, "binary": binary_case, "zero_weight": zero_weight_case,
         "huge": huge_case}


def rollout_for(n, length=6):
  lengths = np.arange(n) % length + 1
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  return sampling.Rollout(
      prompt_ids=np.ones((n, 2), np.int32), prompt_mask=np.ones((n, 2), np.int32),
      completion_ids=mask * 5, completion_mask=mask,
      sampling_logprobs=np.zeros((n, length), np.float32), eos_terminated=lengths < length)


def advantages_and_metrics(r, w, scale, aggregation, axis_name=None):
  adv = grpo.group_advantages(r, w, G, scale, axis_name, aggregation)
  metrics = grpo.reward_metrics(r, adv, rollout_for(r.shape[0]), G, axis_name)
  keys = ("reward", "reward_std", "reward_std/group_mean", "frac_reward_zero_std")
  return adv.advantages, {k: metrics[k] for k in keys}


def assert_matches_trl(adv, metrics, r, w, scale, aggregation):
  want = trl_advantages(r.astype(np.float64), w, G, scale, aggregation)[0]
  np.testing.assert_allclose(np.asarray(adv, np.float64).reshape(-1), want, rtol=2e-5,
                             atol=2e-5)
  for key, value in trl_metrics(r.astype(np.float64), w, G, scale, aggregation).items():
    got = np.asarray(metrics[key], np.float64).reshape(-1)
    np.testing.assert_allclose(got, value, rtol=2e-5, atol=1e-6, err_msg=key)


# ---------------------------------------------------------------------------- tests

@pytest.mark.parametrize("scale, aggregation", MODES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_trl_on_one_device(case, scale, aggregation):
  r, w = CASES[case]()
  adv, metrics = advantages_and_metrics(jnp.asarray(r), w, scale, aggregation)
  assert np.all(np.isfinite(np.asarray(adv)))
  assert_matches_trl(adv, metrics, r, w, scale, aggregation)


def test_gdpo_is_not_sum_then_normalize_and_is_batch_standardised():
  r, w = mixed_case()
  gdpo = np.asarray(grpo.group_advantages(jnp.asarray(r), w, G, "group",
                                          multi_objective_aggregation="normalize_then_sum")
                    .advantages)
  summed = np.asarray(grpo.group_advantages(jnp.asarray(r), w, G, "group").advantages)
  assert np.abs(gdpo - summed).max() > 0.1  # the aggregation order matters here
  # Scored rows are z-scored over the batch: mean 0, Bessel std 1 (up to the 1e-4).
  scored = ~np.isnan(r).all(axis=1)
  assert abs(gdpo[scored].mean()) < 1e-5
  assert gdpo[scored].std(ddof=1) == pytest.approx(1.0, rel=1e-3)
  assert np.all(gdpo[~scored] == 0.0)
  # scale_rewards does not apply to GDPO.
  for scale in grpo.SCALE_REWARDS:
    other = grpo.group_advantages(jnp.asarray(r), w, G, scale,
                                  multi_objective_aggregation="normalize_then_sum")
    np.testing.assert_array_equal(np.asarray(other.advantages), gdpo)


def test_gdpo_ignores_each_functions_scale():
  """Each function is z-scored in its group first: rescaling one function by 1000 (and
  shifting it) leaves GDPO's advantages as they were, but not the summed ones."""
  r, w = binary_case()
  r = r + np.random.default_rng(3).normal(size=r.shape).astype(np.float32) * 0.1
  rescaled = r.copy()
  rescaled[:, 1] = rescaled[:, 1] * 1000.0 + 7.0
  run = lambda x, agg: np.asarray(grpo.group_advantages(
      jnp.asarray(x), w, G, "group", multi_objective_aggregation=agg).advantages)
  np.testing.assert_allclose(run(rescaled, "normalize_then_sum"),
                             run(r, "normalize_then_sum"), rtol=1e-3, atol=1e-3)
  assert np.abs(run(rescaled, "sum_then_normalize") - run(r, "sum_then_normalize")).max() > 0.1


def test_zero_std_fraction_follows_trl_per_mode():
  r, w = binary_case()
  x = jnp.asarray(r)
  frac = lambda rewards, scale, agg="sum_then_normalize": float(advantages_and_metrics(
      rewards, w, scale, agg)[1]["frac_reward_zero_std"])
  # Weighted totals: group 0 all 1.5, group 4 all 0, the rest vary: 2 of 8 groups.
  assert frac(x, "group") == frac(x, "none") == 0.25
  assert frac(x, "batch") == 0.0  # one std for the whole batch, and it is not 0
  assert frac(x, "group", "normalize_then_sum") == 0.0
  same = jnp.ones_like(x)
  assert frac(same, "batch") == 1.0 and frac(same, "group") == 1.0
  assert frac(same, "group", "normalize_then_sum") == 1.0


def test_reward_std_is_the_batch_std_not_the_mean_group_std():
  r, w = binary_case()
  _, metrics = advantages_and_metrics(jnp.asarray(r), w, "group", "sum_then_normalize")
  total = r @ np.asarray(w, np.float32)
  assert float(metrics["reward_std"]) == pytest.approx(np.std(total, ddof=1), rel=1e-5)
  group_mean = np.mean([np.std(t, ddof=1) for t in total.reshape(-1, G)])
  assert float(metrics["reward_std/group_mean"]) == pytest.approx(group_mean, rel=1e-5)
  assert abs(float(metrics["reward_std"]) - group_mean) > 0.05


def _need_4_devices():
  if jax.local_device_count() < 4:
    pytest.skip("needs 4 (fake) devices")


@pytest.mark.parametrize("scale, aggregation", MODES)
@pytest.mark.parametrize("case", ["mixed", "huge"])
def test_pmap_over_4_devices_gives_the_same_numbers(case, scale, aggregation):
  """8 groups, 2 per device: the batch statistics must span every device."""
  _need_4_devices()
  r, w = CASES[case]()
  one = advantages_and_metrics(jnp.asarray(r), w, scale, aggregation)
  shards = jnp.asarray(r).reshape(4, -1, r.shape[1])
  adv, metrics = jax.pmap(lambda x: advantages_and_metrics(x, w, scale, aggregation, "devices"),
                          axis_name="devices", devices=jax.local_devices()[:4])(shards)
  np.testing.assert_allclose(np.asarray(adv).reshape(-1), np.asarray(one[0]), rtol=1e-6,
                             atol=1e-6)
  for key, value in metrics.items():
    value = np.asarray(value)
    assert np.all(value == value[:1]), key  # one global value on every device
    np.testing.assert_allclose(value[0], np.asarray(one[1][key]), rtol=1e-6, atol=1e-7,
                               err_msg=key)
  assert_matches_trl(adv, {k: v[0] for k, v in metrics.items()}, r, w, scale, aggregation)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_jit_of_sharded_global_arrays_gives_the_same_numbers(aggregation):
  """Mesh mode: one program over the global batch, its rows split over the devices."""
  _need_4_devices()
  r, w = mixed_case()
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  x = jax.device_put(jnp.asarray(r), NamedSharding(mesh, PartitionSpec("data")))
  adv, metrics = jax.jit(lambda x: advantages_and_metrics(x, w, "batch", aggregation))(x)
  one = advantages_and_metrics(jnp.asarray(r), w, "batch", aggregation)
  np.testing.assert_allclose(np.asarray(adv), np.asarray(one[0]), rtol=1e-6, atol=1e-6)
  for key in metrics:
    np.testing.assert_allclose(np.asarray(metrics[key]), np.asarray(one[1][key]), rtol=1e-6,
                               atol=1e-7, err_msg=key)
  assert_matches_trl(adv, metrics, r, w, "batch", aggregation)


def test_unknown_aggregation_is_a_config_error():
  with pytest.raises(ConfigError, match="multi_objective_aggregation='mean'.*normalize_then_sum"):
    grpo.group_advantages(jnp.zeros((4, 2)), (1.0, 1.0), 2, "group",
                          multi_objective_aggregation="mean")
