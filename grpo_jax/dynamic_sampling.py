"""DAPO's dynamic sampling, host side: keep the groups that carry a learning signal, sample
more prompts until a step's worth is gathered, fill the rest of the static batch with rows
the update does not see.

A group carries no signal when the train step would give every one of its rows advantage 0:
  * sum_then_normalize (the default): its weighted total rewards (the NaN-aware weighted
    sum of `grpo.combine_rewards`, NaN where every function abstained) have fewer than two
    valid values, or all valid values are equal (zero group std). NaN totals, completions
    no function could score, do not count: a group with one scored completion among NaNs
    carries no signal, one with two different scored totals does (its NaN rows get
    advantage 0, exactly as without dynamic sampling).
  * normalize_then_sum (GDPO, each function z-scored within its group): no function of
    non-zero weight has two different valid values in the group.
Totals are summed in float32 in function order; with three or more functions the device's
summation order may differ, and totals equal only up to rounding could be judged
differently there (a group of advantages ~1e-7 trained on, or such a group left out).
Under GDPO a group without spread gets advantages of ~1e-8 on the device (the batch mean
of the z-scores is 0 up to rounding): it is dropped here, as it carries no signal.

Each sampling round consumes a whole step's prompts (`prompts_per_step`, every host its
share) and keeps this host's informative groups, up to its share of the step's groups;
rounds stop when every host has its share, or after `max_num_gen_batches` rounds. The batch
then holds the kept groups followed by filler groups: copies of sampled rows with an
all-zero completion mask, NaN rewards (so advantage 0, and out of the group and batch
statistics) and `rows_in_loss` 0 (out of the loss normalisation). Filler rows keep their
real prompts so that their forward passes stay finite (an all-masked row could give NaN
log-probs, and NaN * 0 is NaN).

Nothing here is numeric device code: host numpy and the multi-host agreement only.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from grpo_jax import hosts, rollouts, sampling

log = logging.getLogger("grpo_jax")

# Reward metrics of `grpo.reward_metrics` that are a sum over the batch's groups or rows
# divided by their count; filler rows add exactly 0 to each sum (std 0, length 0, not
# clipped), so over the kept groups the value is the batch's times batch / kept count.
# frac_reward_zero_std counts the filler rows too where they have a std of their own (the
# group's: 0), i.e. where advantages are scaled per group; elsewhere every row shares the
# batch's std, the filler's NaN rewards left out, and the fraction is already the kept's.
SCALED_METRICS = ("reward_std/group_mean", "completions/mean_length",
                  "completions/clipped_ratio", "frac_reward_zero_std")


def weighted_totals(rewards: np.ndarray, weights) -> np.ndarray:
  """[N, F] rewards (NaN: not applicable) -> [N] float32 weighted sums, NaN where every
  function abstained: `grpo.combine_rewards` on the host."""
  rewards = np.asarray(rewards, np.float32).reshape(len(rewards), -1)
  weighted = rewards * np.asarray(weights, np.float32)
  valid = ~np.isnan(rewards)
  total = np.zeros(len(rewards), np.float32)
  for column in range(weighted.shape[1]):  # in function order, as the device sums them
    total = total + np.where(valid[:, column], weighted[:, column], np.float32(0))
  return np.where(valid.any(axis=1), total, np.float32(np.nan))


def _varies(grouped: np.ndarray) -> np.ndarray:
  """[groups, G] -> [groups] bool: at least two different valid (non-NaN) values."""
  valid = ~np.isnan(grouped)
  high = np.max(np.where(valid, grouped, -np.inf), axis=1)
  low = np.min(np.where(valid, grouped, np.inf), axis=1)
  return (valid.sum(axis=1) >= 2) & (high > low)


def informative_groups(rewards: np.ndarray, weights, num_generations: int,
                       aggregation: str = "sum_then_normalize") -> np.ndarray:
  """[N, F] rewards of N = groups * G rows -> [groups] bool: the group carries a learning
  signal (some row gets a non-zero advantage; see the module docstring)."""
  rewards = np.asarray(rewards, np.float32).reshape(len(rewards), -1)
  if aggregation == "normalize_then_sum":
    weighted = [f for f, w in enumerate(weights) if w != 0]
    per_function = rewards[:, weighted].reshape(-1, num_generations, len(weighted))
    return np.any([_varies(per_function[..., f]) for f in range(len(weighted))], axis=0)
  return _varies(weighted_totals(rewards, weights).reshape(-1, num_generations))


class Gathered(NamedTuple):
  """One step's batch, on the host: kept groups first, then filler groups."""

  rollout: sampling.Rollout  # host arrays, [groups * G, ...]
  rewards: np.ndarray  # [groups * G, F], NaN in filler rows
  rows_in_loss: np.ndarray | None  # [groups * G] float32, 0 in filler; None: no filtering
  kept_groups: int  # of this host's groups, how many are sampled ones (not filler)
  rounds: int
  sampled_tokens: int  # completion tokens sampled over all rounds (throughput)
  # The last round's placed (device) rollout when the batch is exactly that round's
  # rollout (every group kept): the caller can use it instead of placing the batch again.
  placed: Any = None


class GroupGatherer:
  """Collects one host's groups over the sampling rounds of a step.

  target_groups: this host's share of the step's groups. keep: rewards [N, F] -> [groups]
  bool, the groups to keep (`informative_groups`); None keeps every group and makes one
  round (no dynamic sampling: the batch is the round's rollout as it is).
  """

  def __init__(self, target_groups: int, num_generations: int,
               keep: Callable[[np.ndarray], np.ndarray] | None = None):
    self.target_groups, self.num_generations, self.keep = target_groups, num_generations, keep
    self._parts: list[tuple[sampling.Rollout, np.ndarray]] = []  # kept rows of each round
    self._kept = 0
    self._sampled_tokens = 0
    self._last: tuple[sampling.Rollout, np.ndarray, Any] | None = None
    self._last_whole = False  # the last round's rows are all of the kept rows, in order

  @property
  def kept_groups(self) -> int:
    return self._kept

  @property
  def full(self) -> bool:
    return self._kept >= self.target_groups

  def add(self, rollout: sampling.Rollout, rewards: np.ndarray, placed: Any = None) -> None:
    """One round's host rollout and rewards ([N, F]); `placed`: its device rollout."""
    rewards = np.asarray(rewards, np.float32).reshape(len(rewards), -1)
    groups = len(rewards) // self.num_generations
    keep = (np.ones(groups, bool) if self.keep is None
            else np.asarray(self.keep(rewards), bool))
    # The first groups that fit, in sampling order (excess informative groups are dropped,
    # as DAPO / verl drop what exceeds the batch).
    keep &= np.cumsum(keep) <= self.target_groups - self._kept
    rows = np.repeat(keep, self.num_generations)
    self._last_whole = self._kept == 0 and bool(keep.all())
    self._parts.append((rollout, rewards) if keep.all() else
                       (jax.tree.map(lambda x: np.asarray(x)[rows], rollout), rewards[rows]))
    self._kept += int(keep.sum())
    self._sampled_tokens += int(np.sum(sampling.model_token_mask(rollout)))
    self._last = (rollout, rewards, placed)

  def batch(self, rounds: int) -> Gathered:
    """The step's batch: the kept groups, then filler groups up to `target_groups`."""
    last_rollout, last_rewards, placed = self._last
    if self._last_whole and self.full:
      return Gathered(last_rollout, last_rewards, self._rows_in_loss(0), self._kept, rounds,
                      self._sampled_tokens, placed)
    missing = self.target_groups - self._kept
    filler_rows = missing * self.num_generations
    filler = jax.tree.map(lambda x: np.asarray(x)[:filler_rows], last_rollout)
    filler = filler._replace(completion_mask=np.zeros_like(filler.completion_mask),
                             sampling_logprobs=np.zeros_like(filler.sampling_logprobs),
                             eos_terminated=np.ones_like(filler.eos_terminated))
    rollouts = [part for part, _ in self._parts] + [filler]
    rollout = jax.tree.map(lambda *xs: np.concatenate(xs), *rollouts)
    num_funcs = self._parts[-1][1].shape[1]
    rewards = np.concatenate([r for _, r in self._parts]
                             + [np.full((filler_rows, num_funcs), np.nan, np.float32)])
    return Gathered(rollout, rewards, self._rows_in_loss(filler_rows), self._kept, rounds,
                    self._sampled_tokens)

  def _rows_in_loss(self, filler_rows: int) -> np.ndarray | None:
    if self.keep is None:
      return None
    kept_rows = self._kept * self.num_generations
    return np.concatenate([np.ones(kept_rows, np.float32), np.zeros(filler_rows, np.float32)])


def gather(sample_round: Callable[[int], tuple | None], gatherer: GroupGatherer,
           max_rounds: int) -> Gathered | None:
  """Runs sampling rounds 0, 1, ... until every host's gatherer is full or `max_rounds`
  were made. `sample_round(r)`: (host rollout, rewards [N, F], placed rollout) of round r,
  or None when a stop was requested (then None: the step is abandoned)."""
  rounds = 0
  while True:
    sampled = sample_round(rounds)
    if sampled is None:
      return None
    gatherer.add(*sampled)
    rounds += 1
    # every host must agree on the rounds: each round's sampler is one collective program
    if (gatherer.keep is None or rounds >= max_rounds
        or hosts.agree(gatherer.full, np.all)):
      return gatherer.batch(rounds)


def scales_per_group(scale_rewards: str, aggregation: str) -> bool:
  """Whether each row's advantage is scaled by its own group's std (which a filler group
  has too: 0), rather than by one std of the whole batch."""
  return scale_rewards in ("group", "none") and aggregation == "sum_then_normalize"


def with_sampling_metrics(gathered: Gathered, metrics: dict[str, float], total_groups: int,
                          per_group_std: bool) -> dict[str, float]:
  """A step's metrics with the filler left out of the reward metrics
  (`kept_group_metrics`), and `dynamic_sampling/rounds` and `dynamic_sampling/kept_groups`
  (informative sampled groups, over all hosts, of `total_groups` = prompts_per_step)."""
  kept = hosts.agree(gathered.kept_groups)
  return {**kept_group_metrics(metrics, kept, total_groups, per_group_std),
          "dynamic_sampling/rounds": float(gathered.rounds),
          "dynamic_sampling/kept_groups": float(kept)}


def throughput(gathered: Gathered, seconds: float) -> dict[str, float]:
  """The step's time and its sampled completion tokens per second (all rounds)."""
  return {"step_time": seconds,
          "tokens_per_second": gathered.sampled_tokens / max(seconds, 1e-9)}


class ShortBatchWarnings:
  """Warns when a step's rounds ran out before its batch was full: on the 1st, 10th,
  100th, ... such step, with the count, so a run that keeps hitting it says so without a
  line per step."""

  def __init__(self, max_rounds: int):
    self.max_rounds, self.steps, self.short = max_rounds, 0, 0

  def __call__(self, metrics: dict[str, float], total_groups: int) -> None:
    kept_groups = int(metrics["dynamic_sampling/kept_groups"])
    self.steps += 1
    if kept_groups >= total_groups:
      return
    self.short += 1
    if rollouts.is_power_of_ten(self.short):
      log.warning("dynamic sampling: %d of %d groups had a reward spread after "
                  "max_num_gen_batches=%d rounds; the update trains on those %d (%d such "
                  "steps of %d so far)%s", kept_groups, total_groups, self.max_rounds,
                  kept_groups, self.short, self.steps,
                  "" if kept_groups else ", i.e. it is skipped")


def kept_group_metrics(metrics: dict[str, float], kept_groups: int, total_groups: int,
                       filler_counts_as_zero_std: bool) -> dict[str, float]:
  """The step's reward metrics over its kept groups only (filler out; see SCALED_METRICS:
  a group has G rows, so rows scale like groups). The NaN-aware ones (reward, reward_std,
  rewards/...) leave out the filler's NaN rewards already. With no kept group these are
  NaN. `filler_counts_as_zero_std`: advantages are scaled by each group's own std
  (scale_rewards group or none, and not normalize_then_sum)."""
  out = dict(metrics)
  filler = total_groups - kept_groups
  if not filler:
    return out
  for key in SCALED_METRICS:
    if key in out:
      total = out[key] * total_groups
      if key == "frac_reward_zero_std":
        if not filler_counts_as_zero_std:
          continue
        total -= filler
      out[key] = total / kept_groups if kept_groups else float("nan")
  return out
