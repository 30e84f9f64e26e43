"""The pure GRPO math in grpo_jax/grpo.py against a float64 NumPy transcription of the spec.

Every reference below is written directly from the spec (loops and plain NumPy), not
from the JAX code, so a test only passes when the two independent versions agree:

* rewards [N, F] (NaN = not applicable) -> weighted totals (all-NaN row -> NaN);
* advantages for scale_rewards in {group, batch, none} (Bessel std, NaN ignored,
  std 0 for < 2 valid rewards, NaN totals -> advantage 0, all-equal group -> 0);
* per-token clipped surrogate with asymmetric clip range + beta * k3 KL;
* the loss aggregations (grpo, bnpo, dr_grpo, dapo, cispo, sapo) over a padded mask;
  (the variants against TRL 1.16 itself: tests/test_variants.py);
* chunked log-probs / entropies (values and gradients) for any chunk size;
* the clip metrics reported by grpo_loss;
* reward_metrics; GRPOConfig validation.
"""

from __future__ import annotations

import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax import grpo, sampling
from grpo_jax.errors import ConfigError
from grpo_jax.grpo.advantages import _nan_mean_std
from grpo_jax.models import ModelConfig, Transformer

RTOL = 1e-5
ATOL = 1e-5

# ------------------------------------------------------------------ NumPy references


def ref_combine(rewards: np.ndarray, weights) -> np.ndarray:
  """Row total = sum_f w_f * r_f over the non-NaN entries; NaN if every entry is NaN."""
  rewards = np.asarray(rewards, np.float64)
  n, f = rewards.shape
  total = np.empty(n)
  for i in range(n):
    acc, seen = 0.0, False
    for j in range(f):
      if not math.isnan(rewards[i, j]):
        acc += float(weights[j]) * rewards[i, j]
        seen = True
    total[i] = acc if seen else math.nan
  return total


def ref_nanstd(x: np.ndarray) -> float:
  """Bessel-corrected std of the non-NaN values; 0 when fewer than two are valid."""
  valid = np.asarray(x, np.float64)[~np.isnan(x)]
  if valid.size < 2:
    return 0.0
  return float(np.std(valid, ddof=1))


def ref_nanmean(x: np.ndarray) -> float:
  valid = np.asarray(x, np.float64)[~np.isnan(x)]
  return float(valid.mean()) if valid.size else math.nan


def ref_advantages(rewards, weights, g, scale):
  """(advantages [N], totals [N], group std per row [N])."""
  total = ref_combine(rewards, weights)
  n = total.shape[0]
  batch_std = ref_nanstd(total)
  adv, gstd = np.zeros(n), np.zeros(n)
  for start in range(0, n, g):
    grp = total[start:start + g]
    mean, std = ref_nanmean(grp), ref_nanstd(grp)
    for k in range(g):
      gstd[start + k] = std
      if math.isnan(grp[k]):
        adv[start + k] = 0.0
        continue
      centered = grp[k] - mean
      if scale == "group":
        adv[start + k] = centered / (std + 1e-4)
      elif scale == "batch":
        adv[start + k] = centered / (batch_std + 1e-4)
      else:
        adv[start + k] = centered
  return adv, total, gstd


def ref_per_token(logp, old, ref, adv, eps, eps_high, beta, loss_type="grpo"):
  """(loss, kl, ratio) [N, L] from the spec (TRL 1.16 for cispo and sapo), float64."""
  logp, old = np.asarray(logp, np.float64), np.asarray(old, np.float64)
  a = np.asarray(adv, np.float64)[:, None]
  w = np.exp(logp - old)
  if loss_type == "cispo":  # capped at eps_high itself (ScaleRL's eps_max), not 1 + it
    surrogate = -np.minimum(w, eps_high) * a * logp
  elif loss_type == "sapo":
    tau = np.where(a > 0, 1.0, 1.05)  # the default temperatures
    surrogate = -4.0 / tau / (1.0 + np.exp(-tau * (w - 1.0))) * a
  else:
    unclipped = w * a
    clipped = np.clip(w, 1.0 - eps, 1.0 + eps_high) * a
    surrogate = -np.minimum(unclipped, clipped)
  if ref is None:
    kl = np.zeros_like(logp)
  else:
    d = np.asarray(ref, np.float64) - logp
    kl = np.exp(d) - d - 1.0
  return surrogate + beta * kl, kl, w


def ref_aggregate(loss, mask, loss_type):
  loss, mask = np.asarray(loss, np.float64), np.asarray(mask, np.float64)
  n, length = mask.shape
  if loss_type in ("grpo", "sapo"):
    return float(np.mean([(loss[i] * mask[i]).sum() / mask[i].sum() for i in range(n)]))
  if loss_type == "bnpo":
    return float((loss * mask).sum() / mask.sum())
  if loss_type == "dr_grpo":
    return float((loss * mask).sum() / (n * length))
  if loss_type in ("dapo", "cispo"):
    return float((loss * mask).sum() / mask.sum())
  raise AssertionError(loss_type)


def ref_token_logprobs(hidden, head, targets, temperature):
  """(logp [N,T], entropy [N,T], log-softmax [N,T,V], probs [N,T,V]) in float64."""
  h, w = np.asarray(hidden, np.float64), np.asarray(head, np.float64)
  z = h @ w.T / temperature
  z = z - z.max(-1, keepdims=True)
  logsm = z - np.log(np.exp(z).sum(-1, keepdims=True))
  p = np.exp(logsm)
  logp = np.take_along_axis(logsm, np.asarray(targets)[..., None], -1)[..., 0]
  entropy = -(p * logsm).sum(-1)
  return logp, entropy, logsm, p


def ref_token_logprobs_grads(hidden, head, targets, temperature, c_logp, c_ent):
  """Analytic d/d(hidden) and d/d(head) of sum(c_logp * logp + c_ent * entropy)."""
  h, w = np.asarray(hidden, np.float64), np.asarray(head, np.float64)
  logp, entropy, logsm, p = ref_token_logprobs(hidden, head, targets, temperature)
  onehot = np.eye(w.shape[0])[np.asarray(targets)]
  # d logp_t / dz = onehot - p;  d H / dz = -p * (log p + H)
  dz = (np.asarray(c_logp)[..., None] * (onehot - p)
        + np.asarray(c_ent)[..., None] * (-p * (logsm + entropy[..., None])))
  dz = dz / temperature
  return dz @ w, np.einsum("ntv,ntd->vd", dz, h)


def padded_mask(lengths, length):
  return (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)


# --------------------------------------------------------------- reward test inputs


def reward_case(name: str):
  """(rewards [N, F], weights, G). Every case has 4 prompts x G rows."""
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  if name == "single_func":
    g, f = 4, 1
    r = rng.normal(size=(4 * g, f))
    weights = (1.0,)
  elif name == "three_funcs_weighted":
    g, f = 4, 3
    r = rng.normal(size=(4 * g, f))
    weights = (1.0, 0.5, 2.0)
  elif name == "nans":
    g, f = 4, 3
    r = rng.normal(size=(4 * g, f))
    weights = (0.7, -0.3, 1.5)
    r[0, 1] = np.nan  # single NaNs: rows keep the other functions
    r[5, 0] = np.nan
    r[9, 2] = np.nan
    r[2, :] = np.nan  # a whole all-NaN row: total NaN, advantage 0
    r[12:15, :] = np.nan  # group 3 keeps a single valid row -> std 0, advantage 0
  elif name == "binary_with_equal_groups":
    g, f = 5, 2
    r = rng.integers(0, 2, size=(4 * g, f)).astype(np.float64)
    weights = (1.0, 0.5)
    r[0:5] = [1.0, 0.0]  # all-equal group
    r[10:15] = [1.0, 1.0]  # another all-equal group
    r[16, 1] = np.nan
  elif name == "one_dim":  # [N] rewards are accepted as one function
    g, f = 3, 1
    r = rng.normal(size=(4 * g,))
    weights = (1.0,)
  else:
    raise AssertionError(name)
  return r, weights, g


REWARD_CASES = ["single_func", "three_funcs_weighted", "nans", "binary_with_equal_groups",
                "one_dim"]


# ------------------------------------------------------------------ combine_rewards


def test_combine_rewards_skips_nans_and_weights():
  r = np.array([[1.0, 2.0, 3.0],
                [np.nan, 2.0, 3.0],
                [1.0, np.nan, np.nan],
                [np.nan, np.nan, np.nan],
                [-4.0, 0.5, np.nan]], np.float32)
  w = (0.5, 2.0, -1.0)
  got = np.asarray(grpo.combine_rewards(jnp.asarray(r), w))
  want = ref_combine(r, w)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  np.testing.assert_allclose(got[~np.isnan(want)], want[~np.isnan(want)], rtol=RTOL, atol=ATOL)
  assert np.isnan(got[3]), "an all-NaN row must have a NaN total"
  assert got[1] == pytest.approx(2.0 * 2.0 - 3.0), "NaN entries must be skipped, not zeroed wrongly"


@pytest.mark.parametrize("seed", range(3))
def test_combine_rewards_random(seed):
  rng = np.random.default_rng(seed)
  r = rng.normal(size=(24, 4))
  r[rng.random(r.shape) < 0.3] = np.nan
  r[[3, 11]] = np.nan
  w = tuple(rng.normal(size=4))
  got = np.asarray(grpo.combine_rewards(jnp.asarray(r, jnp.float32), w))
  want = ref_combine(r, w)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  ok = ~np.isnan(want)
  np.testing.assert_allclose(got[ok], want[ok], rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------- advantages


@pytest.mark.parametrize("scale", grpo.SCALE_REWARDS)
@pytest.mark.parametrize("case", REWARD_CASES)
def test_group_advantages_match_reference(case, scale):
  r, w, g = reward_case(case)
  out = grpo.group_advantages(jnp.asarray(r, jnp.float32), w, g, scale)
  r2 = r if r.ndim == 2 else r[:, None]
  want_adv, want_total, want_gstd = ref_advantages(r2, w, g, scale)

  got_adv = np.asarray(out.advantages, np.float64)
  assert np.all(np.isfinite(got_adv)), "advantages must be finite (NaN totals -> 0)"
  # Group scaling divides by std + 1e-4: float32 inputs set the tolerance's floor.
  np.testing.assert_allclose(got_adv, want_adv, rtol=RTOL, atol=1e-4,
                             err_msg=f"advantages ({case}, {scale})")
  got_total = np.asarray(out.rewards, np.float64)
  np.testing.assert_array_equal(np.isnan(got_total), np.isnan(want_total))
  ok = ~np.isnan(want_total)
  np.testing.assert_allclose(got_total[ok], want_total[ok], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.asarray(out.group_std, np.float64), want_gstd, rtol=RTOL,
                             atol=ATOL, err_msg="group_std")

  # Rows with no applicable reward function get advantage exactly 0.
  assert np.all(got_adv[np.isnan(want_total)] == 0.0)
  if case == "nans":
    assert np.isnan(want_total[2]) and got_adv[2] == 0.0
    # The group with a single valid reward: std 0, every advantage 0.
    assert want_gstd[12] == 0.0 and np.asarray(out.group_std)[12] == 0.0
    np.testing.assert_allclose(got_adv[12:16], 0.0, atol=1e-6)
  # Sanity: the test data is not degenerate (a wrong formula could not pass trivially).
  assert np.abs(want_adv).max() > 0.1


def test_advantage_scaling_modes_differ():
  """group / batch / none give genuinely different numbers on the same input."""
  r, w, g = reward_case("three_funcs_weighted")
  outs = {s: np.asarray(grpo.group_advantages(jnp.asarray(r, jnp.float32), w, g, s).advantages)
          for s in grpo.SCALE_REWARDS}
  assert not np.allclose(outs["group"], outs["batch"], rtol=1e-3)
  assert not np.allclose(outs["group"], outs["none"], rtol=1e-3)
  assert not np.allclose(outs["batch"], outs["none"], rtol=1e-3)
  # The mean is per group in every mode: each group's advantages sum to 0.
  for s, adv in outs.items():
    np.testing.assert_allclose(adv.reshape(-1, g).sum(1), 0.0, atol=1e-4, err_msg=s)


def test_group_advantages_rejects_unknown_scale():
  with pytest.raises(ValueError, match="scale_rewards"):
    grpo.group_advantages(jnp.zeros((4, 1)), (1.0,), 2, "per_token")


# Values whose float32 group mean is *not* exact (not dyadic) plus dyadic ones.
EQUAL_VALUES = [0.0, 1.0, -0.5, 0.1, 0.7, 1.0 / 3.0, 2.9, -1.3, 100.3]


@pytest.mark.parametrize("scale", grpo.SCALE_REWARDS)
@pytest.mark.parametrize("g", [2, 3, 7])
def test_all_equal_group_has_exactly_zero_advantage(g, scale):
  """Spec: an all-equal group -> advantage 0, whatever the (weighted) reward value.

  One all-equal group per value in EQUAL_VALUES (weight 0.3 on function 0, function 1
  NaN so the totals are non-trivial floats), plus a last group with spread so that the
  batch std is not 0.
  """
  k = len(EQUAL_VALUES)
  r = np.full(((k + 1) * g, 2), np.nan)
  for i, value in enumerate(EQUAL_VALUES):
    r[i * g:(i + 1) * g, 0] = value
  r[k * g:, 0] = 100.0 * np.arange(g, dtype=np.float64)
  out = grpo.group_advantages(jnp.asarray(r, jnp.float32), (0.3, 1.0), g, scale)
  adv = np.asarray(out.advantages).reshape(k + 1, g)
  gstd = np.asarray(out.group_std).reshape(k + 1, g)
  assert adv[k].std() > 0.1  # the spread group is really scored
  bad = {EQUAL_VALUES[i]: (float(np.abs(adv[i]).max()), float(gstd[i, 0]))
         for i in range(k) if np.any(adv[i] != 0.0)}
  assert not bad, (
      f"SPEC DISAGREEMENT: all-equal groups must have advantage exactly 0 "
      f"(G={g}, scale_rewards={scale!r}, weight 0.3). Failing reward values -> "
      f"(max |advantage|, group_std): {bad}. The float32 group mean of identical values is "
      "not exact, and with scale_rewards='group' the residual is divided by std + 1e-4.")


# ------------------------------------- huge rewards: overflow-free mean / std, bitwise


def unscaled_nan_mean_std(x, axis, axis_name=None):
  """The group statistics as written before the power-of-two scaling (kept verbatim)."""
  valid = ~jnp.isnan(x)
  shift = jnp.max(jnp.where(valid, x, -jnp.inf), axis=axis, keepdims=True)
  if axis_name is not None:
    shift = jax.lax.pmax(shift, axis_name)
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  dev = jnp.where(valid, x - shift, 0.0)
  psum = (lambda v: v) if axis_name is None else (lambda v: jax.lax.psum(v, axis_name))
  count = psum(jnp.sum(valid, axis=axis, keepdims=True))
  mean_dev = psum(jnp.sum(dev, axis=axis, keepdims=True)) / jnp.maximum(count, 1)
  sq_dev = psum(jnp.sum(jnp.where(valid, (dev - mean_dev) ** 2, 0.0), axis=axis,
                        keepdims=True))
  std = jnp.sqrt(sq_dev / jnp.maximum(count - 1, 1))
  return shift + mean_dev, jnp.where(count > 1, std, 0.0)


def unscaled_group_advantages(rewards, weights, g, scale, axis_name=None):
  """group_advantages as written before the scaling: (advantages, totals, group std)."""
  if rewards.ndim == 1:
    rewards = rewards[:, None]
  total = grpo.combine_rewards(rewards.astype(jnp.float32), weights)
  grouped = total.reshape(-1, g)
  mean, std = unscaled_nan_mean_std(grouped, axis=1)
  centered = grouped - mean
  if scale == "group":
    centered = centered / (std + grpo.STD_EPS)
  elif scale == "batch":
    _, batch_std = unscaled_nan_mean_std(total, axis=0, axis_name=axis_name)
    centered = centered / (batch_std + grpo.STD_EPS)
  advantages = jnp.nan_to_num(centered.reshape(-1), nan=0.0)
  return advantages, total, jnp.broadcast_to(std, grouped.shape).reshape(-1)


def float_bits(x) -> np.ndarray:
  """The float32 bit patterns: exact equality, telling -0.0 from 0.0 and NaN from NaN."""
  return np.asarray(x, np.float32).view(np.uint32)


def assert_same_bits(got, want, what):
  got, want = float_bits(got), float_bits(want)
  differ = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
  assert differ.size == 0, (
      f"{what}: {differ.size} of {got.size} values differ from the unscaled formula, first at "
      f"{differ[:5]}: {got.reshape(-1)[differ[:5]].view(np.float32)} vs "
      f"{want.reshape(-1)[differ[:5]].view(np.float32)}")


def ordinary_rewards(seed, g=4, groups=16, funcs=3):
  """[groups * G, F] rewards of assorted magnitudes with every kind of gap.

  Per group: a magnitude from 1e-6 to 1e16 (the unscaled formula is exact-safe up to
  ~1e19), normal / binary / all-equal values, NaNs at random, ragged validity, groups
  with a single valid row and groups with none.
  """
  rng = np.random.default_rng(seed)
  r = rng.normal(size=(groups, g, funcs))
  r *= 10.0 ** rng.integers(-6, 17, size=(groups, 1, 1))
  kinds = rng.integers(0, 6, size=groups)
  for i, kind in enumerate(kinds):
    if kind == 1:  # binary rewards
      r[i] = rng.integers(0, 2, size=(g, funcs))
    elif kind == 2:  # all equal (non-dyadic) values
      r[i] = rng.choice([0.1, 1.0 / 3.0, 2.9, -1.3, 100.3])
    elif kind == 3:  # a single valid row
      r[i, 1:] = np.nan
    elif kind == 4:  # no valid row at all
      r[i] = np.nan
  r[rng.random(r.shape) < 0.25] = np.nan  # ragged: rows with some functions abstaining
  r[0] = [[1.0, np.nan, np.nan]] * g  # an all-equal group with NaN functions
  r[1, :, :] = np.nan
  r[1, 2, 0] = 0.7  # one valid reward in the whole group
  return r.reshape(groups * g, funcs).astype(np.float32), tuple(rng.normal(size=funcs))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("scale", grpo.SCALE_REWARDS)
@pytest.mark.parametrize("seed", range(4))
def test_ordinary_rewards_give_bitwise_the_unscaled_results(seed, scale, jit):
  """The power-of-two scaling is exact: wherever the old formula did not overflow, every
  output bit is the same (advantages, totals, group std)."""
  r, w = ordinary_rewards(seed)
  new = lambda x: tuple(grpo.group_advantages(x, w, 4, scale))
  old = lambda x: unscaled_group_advantages(x, w, 4, scale)
  if jit:
    new, old = jax.jit(new), jax.jit(old)
  got, want = new(jnp.asarray(r)), old(jnp.asarray(r))
  for name, a, b in zip(("advantages", "rewards", "group_std"), got, want):
    assert_same_bits(a, b, f"{name} (seed {seed}, {scale}, jit={jit})")
  assert np.count_nonzero(np.asarray(got[0])) > 16  # not a degenerate batch
  assert np.isnan(np.asarray(got[1])).any() and (np.asarray(got[2]) == 0).any()


@pytest.mark.parametrize("seed", range(3))
def test_nan_mean_std_is_bitwise_the_unscaled_formula(seed):
  r, _ = ordinary_rewards(seed)
  x = jnp.asarray(r)
  for axis in (0, 1):
    for got, want, name in zip(_nan_mean_std(x, axis), unscaled_nan_mean_std(x, axis),
                               ("mean", "std")):
      assert_same_bits(got, want, f"{name} along axis {axis}")
  grouped = x[:, 0].reshape(-1, 4)
  for got, want, name in zip(jax.jit(_nan_mean_std, static_argnums=1)(grouped, 1),
                             unscaled_nan_mean_std(grouped, 1), ("mean", "std")):
    assert_same_bits(got, want, f"jit {name}")


def _pmapped(fn, *arrays):
  """fn(*per-device shards) over 4 devices with axis name 'devices' -> stacked outputs."""
  if jax.local_device_count() < 4:
    pytest.skip("needs 4 (fake) devices")
  shards = [jnp.asarray(a).reshape((4, -1) + a.shape[1:]) for a in arrays]
  return jax.pmap(fn, axis_name="devices", devices=jax.local_devices()[:4])(*shards)


@pytest.mark.parametrize("seed", range(2))
def test_ordinary_rewards_bitwise_under_pmap(seed):
  r, w = ordinary_rewards(seed)  # 16 groups: 4 per device
  got = _pmapped(lambda x: (tuple(grpo.group_advantages(x, w, 4, "batch", "devices"))[:3]
                            + _nan_mean_std(x, 0, "devices")), r)
  want = _pmapped(lambda x: (unscaled_group_advantages(x, w, 4, "batch", "devices")
                             + unscaled_nan_mean_std(x, 0, "devices")), r)
  for name, a, b in zip(("advantages", "rewards", "group_std", "mean", "std"), got, want):
    assert_same_bits(a, b, f"pmap {name}")
  # the cross-device statistics really are global: the same on every device
  assert np.all(np.asarray(got[4]) == np.asarray(got[4])[:1])


F32_MAX = float(np.finfo(np.float32).max)
# Groups of G=4: huge, tiny and ordinary values side by side in one batch.
HUGE_GROUPS = [
    [1e30, 0.0, 0.0, 0.0],  # the probe: std overflowed, every advantage was 0
    [3e38, 0.0, 0.0, 0.0],
    [F32_MAX, -F32_MAX, 0.0, 0.0],  # the largest finite values, both signs
    [-3e38, 1.0, 2.0, np.nan],
    [1e30, np.nan, -1e30, 5e29],
    [1e30, 1e30, 1e30, 1e30],  # all equal: advantage exactly 0
    [1e-3, 2e-3, 0.0, 5e-4],
    [1.0, 0.0, 1.0, 1.0],
]
# Batch scaling: 1e30 groups next to 1e-3 groups (the batch std is ~1e30).
MIXED_GROUPS = [[1e30, 0.0, 0.0, 0.0], [1e-3, 2e-3, 0.0, 5e-4], [2e30, -1e30, np.nan, 0.0],
                [0.0, 1e-3, 1e-3, 1e-3], [3e29, 3e29, 3e29, 3e29], [1e30, 1e30, 0.0, 0.0],
                [-1e-3, 0.0, np.nan, 1e-3], [5.0, 1e30, 2e30, 3e30]]


@pytest.mark.parametrize("scale", grpo.SCALE_REWARDS)
@pytest.mark.parametrize("groups", [HUGE_GROUPS, MIXED_GROUPS], ids=["huge", "mixed"])
def test_huge_rewards_give_finite_advantages_matching_float64(groups, scale):
  r = np.array(groups, np.float64).reshape(-1, 1)
  assert np.all(np.isfinite(np.float32(r)[~np.isnan(r)]))  # every input is a finite float32
  r = np.float32(r).astype(np.float64)  # the reference sees exactly what the code sees
  out = grpo.group_advantages(jnp.asarray(r, jnp.float32), (1.0,), 4, scale)
  want_adv, want_total, want_gstd = ref_advantages(r, (1.0,), 4, scale)
  adv = np.asarray(out.advantages, np.float64)
  assert np.all(np.isfinite(adv))
  # float32 tolerance, relative to each advantage's own scale
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(want_adv).max())
                             if scale == "none" else 1e-6)
  np.testing.assert_allclose(np.asarray(out.group_std, np.float64), want_gstd, rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(out.group_std)))
  if scale == "group" and groups is HUGE_GROUPS:
    np.testing.assert_allclose(adv[:4], [1.5, -0.5, -0.5, -0.5], rtol=1e-5)
    np.testing.assert_allclose(adv[8:12], [1.2247449, -1.2247449, 0.0, 0.0], rtol=1e-5)
    assert np.all(adv[20:24] == 0.0)  # all-equal 1e30 group
  if scale != "none":
    assert np.abs(adv).max() > 0.5  # huge groups are really scored, not zeroed


def test_huge_statistics_match_float64():
  x = np.float32(np.array(HUGE_GROUPS + MIXED_GROUPS))
  mean, std = _nan_mean_std(jnp.asarray(x), axis=1)
  for i, row in enumerate(x.astype(np.float64)):
    assert float(mean[i, 0]) == pytest.approx(ref_nanmean(row), rel=1e-6, abs=1e-9)
    assert float(std[i, 0]) == pytest.approx(ref_nanstd(row), rel=1e-5, abs=1e-9)
  flat_mean, flat_std = _nan_mean_std(jnp.asarray(x.reshape(-1)), axis=0)
  # +-F32_MAX nearly cancel: float32 resolves the mean to ~1e-7 of the largest value.
  assert float(flat_mean[0]) == pytest.approx(ref_nanmean(x.reshape(-1)), abs=1e-6 * F32_MAX)
  assert float(flat_std[0]) == pytest.approx(ref_nanstd(x.reshape(-1)), rel=1e-5)


def test_huge_rewards_under_pmap_share_one_scale():
  """Batch std over 4 devices where only one device holds 1e30 rewards."""
  small = [[1e-3, 2e-3, 0.0, 5e-4], [0.0, 1e-3, 1e-3, 1e-3], [-1e-3, 0.0, np.nan, 1e-3]]
  # 8 groups, 2 per device: device 0 holds a 1e30 group, devices 1..3 only small ones.
  groups = np.float32(np.array([[1e30, 0.0, 0.0, 0.0]] + small * 2 + [[2e-3, 0.0, 0.0, 0.0]]))
  groups = groups.reshape(-1, 1)
  got = _pmapped(lambda x: (grpo.group_advantages(x, (1.0,), 4, "batch", "devices").advantages,
                            *_nan_mean_std(x, 0, "devices")), groups)
  adv = np.asarray(got[0]).reshape(-1)
  want_adv, _, _ = ref_advantages(groups.astype(np.float64), (1.0,), 4, "batch")
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
  assert np.abs(adv).max() > 0.5
  valid = groups[~np.isnan(groups)].astype(np.float64)
  np.testing.assert_allclose(np.asarray(got[1]).reshape(-1), valid.mean(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got[2]).reshape(-1), np.std(valid, ddof=1), rtol=1e-5)


# ------------------------------------------------------------------- per-token loss


def clipping_case(seed=0, n=6, length=9, eps=0.2, eps_high=0.28):
  """logp/old/ref/adv/mask where ratios deliberately cross both clip bounds.

  Ratios come from a palette spanning every region: below 1-eps, between 1-eps and 1,
  1, between 1+eps and 1+eps_high (clipped only with eps_high == eps), above 1+eps_high.
  """
  rng = np.random.default_rng(seed)
  palette = np.array([0.5, 0.78, 0.9, 1.0, 1.1, 1.25, 1.4, 2.0])
  ratios = rng.choice(palette, size=(n, length))
  # Guarantee each region on both advantage signs: rows alternate sign.
  adv = np.where(np.arange(n) % 2 == 0, 1.0, -1.0) * rng.uniform(0.3, 2.0, size=n)
  ratios[0, :4] = [2.0, 1.25, 0.5, 1.4]  # A > 0
  ratios[1, :4] = [0.5, 0.78, 2.0, 1.1]  # A < 0
  logp = rng.uniform(-4.0, -0.1, size=(n, length))
  old = logp - np.log(ratios)
  ref = logp + rng.normal(scale=0.3, size=(n, length))
  lengths = rng.integers(4, length + 1, size=n)
  lengths[0], lengths[1], lengths[2] = length, 5, 4
  mask = padded_mask(lengths, length)
  mask[3, 1] = 0  # a masked token inside a row, not only trailing padding
  return logp, old, ref, adv, mask, eps, eps_high


def loss_cfg(eps=0.2, eps_high=0.28, beta=0.04, loss_type="grpo", **changes):
  return grpo.GRPOConfig(sampling=samp(), epsilon=eps, epsilon_high=eps_high, beta=beta,
                         loss_type=loss_type, **changes)


def token_loss_of(logp, old, ref, adv, mask, cfg):
  f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  return grpo.per_token_loss(f32(logp), f32(old), f32(ref), f32(adv), f32(mask), cfg)


@pytest.mark.parametrize("beta", [0.04, 0.5])
@pytest.mark.parametrize("eps,eps_high", [(0.2, 0.28), (0.2, 0.2), (0.1, 0.3)])
def test_per_token_loss_matches_reference(eps, eps_high, beta):
  logp, old, ref, adv, mask, _, _ = clipping_case(eps=eps, eps_high=eps_high)
  loss, kl, ratio = token_loss_of(logp, old, ref, adv, mask, loss_cfg(eps, eps_high, beta))
  want_loss, want_kl, want_w = ref_per_token(logp, old, ref, adv, eps, eps_high, beta)
  np.testing.assert_allclose(np.asarray(ratio), want_w, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.asarray(kl), want_kl, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.asarray(loss), want_loss, rtol=RTOL, atol=ATOL)
  assert np.all(want_kl >= 0) and want_kl.max() > 1e-3


def test_per_token_loss_without_kl_term_has_no_kl():
  logp, old, _, adv, mask, eps, eps_high = clipping_case()
  loss, kl, _ = token_loss_of(logp, old, None, adv, mask, loss_cfg(eps, eps_high, beta=0.0))
  want_loss, _, _ = ref_per_token(logp, old, None, adv, eps, eps_high, 0.0)
  assert kl is None  # beta = 0: no reference log-probs needed, no kl metric
  np.testing.assert_allclose(np.asarray(loss), want_loss, rtol=RTOL, atol=ATOL)


def test_clipping_happens_on_both_sides_and_uses_epsilon_high():
  eps, eps_high = 0.2, 0.28
  logp, old, ref, adv, _, _, _ = clipping_case(eps=eps, eps_high=eps_high)
  mask = np.ones_like(logp)
  loss, _, ratio = token_loss_of(logp, old, None, adv, mask, loss_cfg(eps, eps_high, 0.0))
  loss, w = np.asarray(loss, np.float64), np.exp(logp - old)
  a = adv[:, None] * np.ones_like(w)
  unclipped = -w * a

  low = (w < 1 - eps) & (a < 0)
  high = (w > 1 + eps_high) & (a > 0)
  assert low.sum() >= 2 and high.sum() >= 2, "test data must exercise both clip bounds"
  # Clipped tokens use the bound, not the ratio, and differ from the unclipped surrogate.
  np.testing.assert_allclose(loss[low], -(1 - eps) * a[low], rtol=RTOL)
  np.testing.assert_allclose(loss[high], -(1 + eps_high) * a[high], rtol=RTOL)
  assert np.all(np.abs(loss[low] - unclipped[low]) > 1e-3)
  assert np.all(np.abs(loss[high] - unclipped[high]) > 1e-3)
  # The pessimistic side is never clipped: low ratio with A > 0, high ratio with A < 0.
  pessimistic = ((w < 1 - eps) & (a > 0)) | ((w > 1 + eps_high) & (a < 0))
  assert pessimistic.sum() >= 2
  np.testing.assert_allclose(loss[pessimistic], unclipped[pessimistic], rtol=RTOL)
  # Ratio 1.25 with A > 0 sits inside [1 - eps, 1 + eps_high] but outside 1 + eps:
  # it must NOT be clipped (epsilon_high is really used for the upper bound).
  between = np.isclose(w, 1.25) & (a > 0)
  assert between.any()
  np.testing.assert_allclose(loss[between], unclipped[between], rtol=RTOL)
  loss_sym, _, _ = token_loss_of(logp, old, None, adv, mask, loss_cfg(eps, eps, 0.0))
  np.testing.assert_allclose(np.asarray(loss_sym)[between], -(1 + eps) * a[between], rtol=RTOL)


# -------------------------------------------------------------------- aggregation


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("seed", range(3))
def test_aggregate_loss_matches_reference(loss_type, seed):
  rng = np.random.default_rng(100 + seed)
  n, length = 8, 11
  token_loss = rng.normal(size=(n, length))
  lengths = rng.integers(1, length + 1, size=n)
  lengths[0], lengths[1] = length, 1
  mask = padded_mask(lengths, length)
  mask[2, 0] = 0 if lengths[2] > 1 else 1  # holes inside rows
  mask[0, 5] = 0
  # Padded positions hold garbage: they must not leak into the loss.
  token_loss = np.where(mask > 0, token_loss, 1e3)

  norms = grpo.loss_normalizers(jnp.asarray(mask), None)
  assert float(norms.num_shards) == 1.0
  np.testing.assert_array_equal(norms.shard_tokens, np.full(n, mask.sum()))
  assert float(norms.global_rows) == n
  assert float(norms.global_tokens) == mask.sum()
  got = float(grpo.aggregate_loss(jnp.asarray(token_loss, jnp.float32), jnp.asarray(mask),
                                  loss_type, norms))
  want = ref_aggregate(token_loss, mask, loss_type)
  assert got == pytest.approx(want, rel=RTOL, abs=ATOL)


def test_loss_types_are_distinct_and_bnpo_equals_dapo_on_one_device():
  rng = np.random.default_rng(7)
  n, length = 6, 10
  token_loss = rng.uniform(0.5, 2.0, size=(n, length))
  mask = padded_mask([10, 3, 7, 1, 5, 9], length)
  norms = grpo.loss_normalizers(jnp.asarray(mask), None)
  got = {t: float(grpo.aggregate_loss(jnp.asarray(token_loss, jnp.float32), jnp.asarray(mask),
                                      t, norms)) for t in grpo.LOSS_TYPES}
  assert got["bnpo"] == pytest.approx(got["dapo"], rel=1e-6)
  for a, b in [("grpo", "bnpo"), ("grpo", "dr_grpo"), ("bnpo", "dr_grpo")]:
    assert abs(got[a] - got[b]) > 1e-3, (a, b, got)


def test_aggregate_loss_rejects_unknown_type():
  mask = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="loss_type"):
    grpo.aggregate_loss(jnp.zeros((2, 3)), mask, "sum", grpo.loss_normalizers(mask, None))


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_full_loss_pipeline(loss_type):
  """per_token_loss -> aggregate_loss with padding, clipping and KL, against the reference."""
  logp, old, ref, adv, mask, eps, eps_high = clipping_case(seed=3)
  tl, _, _ = token_loss_of(logp, old, ref, adv, mask, loss_cfg(eps, eps_high, 0.04, loss_type))
  got = float(grpo.aggregate_loss(tl, jnp.asarray(mask), loss_type,
                                  grpo.loss_normalizers(jnp.asarray(mask), None)))
  want_tl, _, _ = ref_per_token(logp, old, ref, adv, eps, eps_high, 0.04, loss_type)
  assert got == pytest.approx(ref_aggregate(want_tl, mask, loss_type), rel=RTOL, abs=ATOL)


# ----------------------------------------------------------------------- log-probs

LP_N, LP_T, LP_D, LP_V = 3, 10, 16, 37


def logprob_inputs(seed=0):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(LP_N, LP_T, LP_D)).astype(np.float32)
  head = (rng.normal(size=(LP_V, LP_D)) * 0.5).astype(np.float32)
  targets = rng.integers(0, LP_V, size=(LP_N, LP_T)).astype(np.int32)
  return hidden, head, targets


# Vocabulary entries per chunk (V = 37): one, sizes whose last chunk overlaps the one
# before (37 is prime), and more than V.
CHUNKS = [1, 3, 4, 7, LP_T, LP_N * LP_T, 64]


@functools.lru_cache(maxsize=None)
def chunked_logprobs(seed, chunk, temperature):
  hidden, head, targets = map(jnp.asarray, logprob_inputs(seed))
  return tuple(np.asarray(x) for x in grpo.token_logprobs(hidden, head, targets, temperature,
                                                          chunk))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_token_logprobs_match_reference(chunk, temperature):
  hidden, head, targets = logprob_inputs()
  logp, ent = chunked_logprobs(0, chunk, temperature)
  assert logp.shape == ent.shape == (LP_N, LP_T)
  want_logp, want_ent, _, _ = ref_token_logprobs(hidden, head, targets, temperature)
  np.testing.assert_allclose(np.asarray(logp), want_logp, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.asarray(ent), want_ent, rtol=RTOL, atol=ATOL)
  assert np.all(np.asarray(logp) <= 0)
  assert np.all(np.asarray(ent) >= 0) and np.all(np.asarray(ent) <= np.log(LP_V) + 1e-5)


def test_token_logprobs_same_for_every_chunk_size():
  base = chunked_logprobs(0, LP_N * LP_T, 0.7)
  for chunk in CHUNKS + [0]:  # 0: sized from the vocabulary
    out = chunked_logprobs(0, chunk, 0.7)
    for got, want, name in zip(out, base, ("logp", "entropy")):
      # Only float rounding may differ (a 1-row matmul is not summed like a 30-row one).
      np.testing.assert_allclose(got, want, rtol=3e-5, atol=1e-5,
                                 err_msg=f"{name}, chunk_size={chunk}")


@pytest.mark.parametrize("chunk", [1, 4, LP_T, 64, 0])
def test_token_logprobs_gradients(chunk):
  hidden, head, targets = logprob_inputs(2)
  temperature = 0.7
  rng = np.random.default_rng(5)
  c_logp = rng.normal(size=(LP_N, LP_T)).astype(np.float32)
  c_ent = rng.normal(size=(LP_N, LP_T)).astype(np.float32)

  def objective(h, w, chunk_size):
    logp, ent = grpo.token_logprobs(h, w, jnp.asarray(targets), temperature, chunk_size)
    return jnp.sum(c_logp * logp + c_ent * ent)

  def unchunked(h, w):  # the plain computation, full [N, T, V] logits at once
    logits = jnp.einsum("ntd,vd->ntv", h, w) / temperature
    logsm = jax.nn.log_softmax(logits, -1)
    logp = jnp.take_along_axis(logsm, jnp.asarray(targets)[..., None], -1)[..., 0]
    ent = -jnp.sum(jnp.exp(logsm) * logsm, -1)
    return jnp.sum(c_logp * logp + c_ent * ent)

  gh, gw = jax.jit(jax.grad(objective, argnums=(0, 1)), static_argnums=2)(
      jnp.asarray(hidden), jnp.asarray(head), chunk)
  uh, uw = jax.jit(jax.grad(unchunked, argnums=(0, 1)))(jnp.asarray(hidden), jnp.asarray(head))
  want_h, want_w = ref_token_logprobs_grads(hidden, head, targets, temperature, c_logp, c_ent)
  np.testing.assert_allclose(np.asarray(gh), np.asarray(uh), rtol=1e-5, atol=1e-5,
                             err_msg="d/d hidden vs unchunked JAX")
  np.testing.assert_allclose(np.asarray(gh), want_h, rtol=1e-4, atol=1e-5,
                             err_msg="d/d hidden vs analytic float64")
  np.testing.assert_allclose(np.asarray(gw), np.asarray(uw), rtol=1e-5, atol=1e-5,
                             err_msg="d/d head vs unchunked JAX")
  np.testing.assert_allclose(np.asarray(gw), want_w, rtol=1e-4, atol=1e-4,
                             err_msg="d/d head vs analytic float64")
  assert np.abs(want_h).max() > 1e-2  # non-trivial gradient


# ------------------------------------------------- grpo_loss: clip metrics end to end

TINY = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                   intermediate_size=32)


def tiny_rollout(n, prompt_len, length, seed=0):
  rng = np.random.default_rng(seed)
  prompt_lens = rng.integers(1, prompt_len + 1, size=n)
  prompt_mask = (np.arange(prompt_len)[None] >= (prompt_len - prompt_lens)[:, None])
  prompt_ids = np.where(prompt_mask, rng.integers(2, 32, size=(n, prompt_len)), 0)
  lengths = rng.integers(2, length + 1, size=n)
  lengths[0] = length
  completion_mask = padded_mask(lengths, length)
  completion_ids = np.where(completion_mask > 0, rng.integers(2, 32, size=(n, length)), 0)
  return sampling.Rollout(
      prompt_ids=prompt_ids.astype(np.int32), prompt_mask=prompt_mask.astype(np.int32),
      completion_ids=completion_ids.astype(np.int32),
      completion_mask=completion_mask.astype(np.int32),
      sampling_logprobs=np.zeros((n, length), np.float32), eos_terminated=lengths < length)


@pytest.fixture(scope="module")
def tiny_policy():
  model_def, params = nnx.split(Transformer(TINY, nnx.Rngs(0)))
  rollout = tiny_rollout(6, 4, 8)
  logp, entropy = grpo.completion_logprobs(model_def, params, rollout, 0.9, 3)
  return model_def, params, rollout, np.asarray(logp, np.float64), np.asarray(entropy, np.float64)


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_grpo_loss_clip_metrics_and_value(loss_type, tiny_policy):
  g, n, length = 3, 6, 8
  eps, eps_high, beta, chunk = 0.2, 0.28, 0.04, 3
  model_def, params, rollout, logp, entropy = tiny_policy
  cfg = grpo.GRPOConfig(
      sampling=sampling.SamplingConfig(max_completion_length=length, eos_token_ids=(1,),
                                       num_generations=g, temperature=0.9),
      beta=beta, epsilon=eps, epsilon_high=eps_high, loss_type=loss_type,
      num_iterations=2, logprob_chunk_size=chunk)
  assert cfg.temperature == 0.9 and cfg.logprob_chunk_size == 3  # as in tiny_policy

  rng = np.random.default_rng(11)
  ratios = rng.choice([0.5, 0.78, 0.9, 1.0, 1.1, 1.25, 1.4, 2.0], size=(n, length))
  adv = np.array([1.0, -0.7, 0.4, -1.3, 0.9, -0.2])
  old = (logp - np.log(ratios)).astype(np.float32)
  ref = (logp + rng.normal(scale=0.3, size=(n, length))).astype(np.float32)
  scored = grpo.ScoredRollout(rollout, jnp.asarray(adv, jnp.float32), jnp.asarray(old),
                              jnp.asarray(ref))
  norms = grpo.loss_normalizers(rollout.completion_mask, None)
  loss, got = grpo.grpo_loss(params, model_def, scored, norms, cfg)

  mask = np.asarray(rollout.completion_mask, np.float64)
  want_tl, want_kl, w = ref_per_token(logp, old, ref, adv, eps, eps_high, beta, loss_type)
  a = adv[:, None]
  low = ((w < 1 - eps) & (a < 0)).astype(np.float64)
  high = ((w > 1 + eps_high) & (a > 0)).astype(np.float64)
  assert (low * mask).sum() >= 1 and (high * mask).sum() >= 1, "data must clip both sides"
  # Clipping in padded positions must not be counted.
  assert (low * (1 - mask)).sum() + (high * (1 - mask)).sum() >= 1
  # A 1.25 ratio with A > 0 is inside eps_high but outside eps: not a high clip.
  assert ((np.isclose(w, 1.25) & (a > 0)) * mask).sum() >= 1

  mean = lambda x: (x * mask).sum() / mask.sum()
  want = {"kl": mean(want_kl), "entropy": mean(entropy)}
  if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):  # TRL logs clip ratios for these only
    want.update({"clip_ratio/low_mean": mean(low), "clip_ratio/high_mean": mean(high),
                 "clip_ratio/region_mean": mean(low + high)})
  elif loss_type == "cispo":  # its cap is eps_high itself
    want["cispo_clip_ratio"] = mean((w > eps_high) & (a > 0))
  assert set(got) == set(want)
  for k, v in want.items():
    assert float(got[k]) == pytest.approx(v, rel=RTOL, abs=ATOL), k
  assert float(loss) == pytest.approx(ref_aggregate(want_tl, mask, loss_type), rel=RTOL,
                                      abs=ATOL)


# --------------------------------------------------------------------- reward_metrics


@pytest.mark.parametrize("case", ["three_funcs_weighted", "nans", "binary_with_equal_groups"])
def test_reward_metrics(case):
  r, w, g = reward_case(case)
  n, length = r.shape[0], 9
  rng = np.random.default_rng(3)
  lengths = rng.integers(1, length + 1, size=n)
  lengths[[0, 4, 7]] = length  # full length: no EOS, counted as clipped
  lengths[1] = length - 1
  mask = padded_mask(lengths, length)
  rollout = sampling.Rollout(
      prompt_ids=np.ones((n, 3), np.int32), prompt_mask=np.ones((n, 3), np.int32),
      completion_ids=np.where(mask > 0, 5, 0).astype(np.int32), completion_mask=mask,
      sampling_logprobs=np.zeros((n, length), np.float32), eos_terminated=lengths < length)
  rj = jnp.asarray(r, jnp.float32)
  adv = grpo.group_advantages(rj, w, g, "group")
  got = {k: np.asarray(v) for k, v in grpo.reward_metrics(rj, adv, rollout, g).items()}

  total = ref_combine(r, w)
  group_stds = np.array([ref_nanstd(total[i:i + g]) for i in range(0, n, g)])
  want = {
      "reward": ref_nanmean(total),
      "reward_std": ref_nanstd(total),  # TRL 1.x: the std over the whole batch
      "reward_std/group_mean": group_stds.mean(),
      "frac_reward_zero_std": float(np.mean(group_stds == 0.0)),
      "rewards_per_func/mean": np.array([ref_nanmean(r[:, j]) for j in range(r.shape[1])]),
      "rewards_per_func/std": np.array([ref_nanstd(r[:, j]) for j in range(r.shape[1])]),
      "completions/mean_length": lengths.mean(),
      "completions/clipped_ratio": float(np.mean(lengths == length)),
  }
  assert set(want) <= set(got), sorted(got)
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, rtol=RTOL, atol=ATOL, err_msg=k)
  assert want["completions/clipped_ratio"] == pytest.approx(3 / n)
  if case == "binary_with_equal_groups":
    assert want["frac_reward_zero_std"] >= 0.5
  if case == "nans":
    assert want["frac_reward_zero_std"] == 0.25  # the group with one valid reward


# ---------------------------------------------------------------------- GRPOConfig


def samp(**kw):
  return sampling.SamplingConfig(**{"max_completion_length": 8, "eos_token_ids": (1,),
                                    "num_generations": 4, **kw})


def test_config_valid_and_derived_fields():
  cfg = grpo.GRPOConfig(sampling=samp(), epsilon=0.2, epsilon_high=0.28, num_reward_funcs=2,
                        reward_weights=(1.0, 0.5))
  assert cfg.clip_range == pytest.approx((0.8, 1.28))
  assert cfg.weights == (1.0, 0.5)
  assert cfg.num_generations == 4
  default = grpo.GRPOConfig(sampling=samp(), epsilon=0.1, num_reward_funcs=3)
  assert default.clip_range == pytest.approx((0.9, 1.1))
  assert default.weights == (1.0, 1.0, 1.0)
  for t in grpo.LOSS_TYPES:
    grpo.GRPOConfig(sampling=samp(), loss_type=t)
  for s in grpo.SCALE_REWARDS:
    grpo.GRPOConfig(sampling=samp(), scale_rewards=s)


@pytest.mark.parametrize("g", [0, 1])
def test_config_rejects_small_group(g):
  with pytest.raises(ValueError, match="num_generations"):
    grpo.GRPOConfig(sampling=samp(num_generations=g))


@pytest.mark.parametrize("field,allowed", [("loss_type", ("grpo", "bnpo", "dr_grpo", "dapo")),
                                           ("scale_rewards", ("group", "batch", "none"))])
def test_config_rejects_unknown_enum(field, allowed):
  with pytest.raises(ValueError) as err:
    grpo.GRPOConfig(sampling=samp(), **{field: "bogus"})
  msg = str(err.value)
  assert field in msg
  for value in allowed:
    assert value in msg, f"{value!r} missing from {msg!r}"


@pytest.mark.parametrize("eps", [0.0, -0.1])
def test_config_rejects_bad_epsilon(eps):
  with pytest.raises(ValueError, match="epsilon"):
    grpo.GRPOConfig(sampling=samp(), epsilon=eps)


@pytest.mark.parametrize("weights,funcs", [((1.0,), 2), ((1.0, 2.0, 3.0), 2), ((1.0, 1.0), 1)])
def test_config_rejects_wrong_number_of_weights(weights, funcs):
  with pytest.raises(ValueError, match="reward_weights"):
    grpo.GRPOConfig(sampling=samp(), reward_weights=weights, num_reward_funcs=funcs)


def test_micro_batch_rows_explicit_or_whole():
  assert grpo.micro_batch_rows(32, 0) == 32  # 0: the whole batch (the trainer plans it)
  assert grpo.micro_batch_rows(32, 4) == 4
  with pytest.raises(ConfigError, match="micro_batch_size=5"):
    grpo.micro_batch_rows(32, 5)
