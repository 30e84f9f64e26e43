"""The clipped surrogate + KL per token, its normalisation (loss_type), and the loss."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from grpo_jax import sampling
from grpo_jax.errors import ConfigError
from grpo_jax.grpo.logprobs import completion_logprobs
from grpo_jax.grpo.types import LOSS_TYPES, GRPOConfig, _psum


def per_token_loss(logprobs, old_logprobs, ref_logprobs, advantages, clip_range, beta):
  """Clipped surrogate + beta * k3 KL per token. Returns (loss, kl, ratio) each [N, L]."""
  low, high = clip_range
  ratio = jnp.exp(logprobs - old_logprobs)
  adv = advantages[:, None]
  surrogate = -jnp.minimum(ratio * adv, jnp.clip(ratio, low, high) * adv)
  if ref_logprobs is None:
    kl = jnp.zeros_like(logprobs)
  else:
    delta = ref_logprobs - logprobs
    kl = jnp.exp(delta) - delta - 1.0
  return surrogate + beta * kl, kl, ratio


class LossNormalizers(NamedTuple):
  """The counts the loss is normalised by, taken over the whole batch before it is split
  into micro-batches: every row's share of the loss then depends on nothing else."""

  num_devices: jax.Array
  global_rows: jax.Array
  global_tokens: jax.Array
  device_tokens: jax.Array  # this device's completion tokens (bnpo's per-device mean)
  completion_length: jax.Array  # max_completion_length (dr_grpo), not the passes' width


def loss_normalizers(completion_mask, axis_name, max_completion_length: int | None = None,
                     rows_in_loss: jax.Array | None = None) -> LossNormalizers:
  """max_completion_length: the configured one, when the passes run on fewer positions
  (a batch whose completions all stopped early); None: the mask's width.
  rows_in_loss: [N] 1.0 for rows the loss counts, 0.0 for filler rows (dynamic sampling's;
  their completion mask is all zero too); None: every row counts."""
  mask = completion_mask.astype(jnp.float32)
  rows = (jnp.float32(mask.shape[0]) if rows_in_loss is None
          else jnp.sum(rows_in_loss.astype(jnp.float32)))
  return LossNormalizers(
      num_devices=_psum(jnp.float32(1.0), axis_name),
      global_rows=_psum(rows, axis_name),
      global_tokens=_psum(mask.sum(), axis_name),
      device_tokens=mask.sum(),
      completion_length=jnp.float32(max_completion_length or mask.shape[1]))


def aggregate_loss(token_loss, completion_mask, loss_type: str, norms: LossNormalizers):
  """These rows' share of the global loss: the shares of all rows (over micro-batches and
  devices) sum to the loss."""
  mask = completion_mask.astype(jnp.float32)
  masked_sum = jnp.sum(token_loss * mask)
  if loss_type == "grpo":
    per_seq = jnp.sum(token_loss * mask, -1) / jnp.maximum(mask.sum(-1), 1.0)
    return per_seq.sum() / norms.global_rows
  if loss_type == "bnpo":
    return masked_sum / jnp.maximum(norms.device_tokens, 1.0) / norms.num_devices
  if loss_type == "dr_grpo":
    return masked_sum / (norms.global_rows * norms.completion_length)
  if loss_type == "dapo":
    return masked_sum / jnp.maximum(norms.global_tokens, 1.0)
  raise ConfigError(f"loss_type={loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")


class ScoredRollout(NamedTuple):
  """A rollout with everything the loss needs that does not depend on the current params."""

  rollout: sampling.Rollout
  advantages: jax.Array  # [N]
  old_logprobs: jax.Array | None  # [N, L]; None: num_iterations == 1 (ratio is exactly 1)
  ref_logprobs: jax.Array | None  # [N, L]; None: beta == 0
  # [N] 1.0 where the completion has a valid (non-NaN) total reward; none in the global
  # batch: no learning signal, the update is skipped. None: not tracked (all valid).
  rewarded_rows: jax.Array | None = None
  # [N] 1.0 for rows that count in the loss and its normalisation, 0.0 for filler rows
  # (dynamic sampling fills the batch's static shape with them; their completion mask is
  # all zero). None: every row counts.
  rows_in_loss: jax.Array | None = None


# Token-level metrics grpo_loss sums over completion tokens (divided by the token count later).
TOKEN_METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
                 "clip_ratio/region_mean")


def grpo_loss(params, model_def, scored: ScoredRollout, norms: LossNormalizers,
              cfg: GRPOConfig, axis_name=None):
  """(this device's share of the loss, token-level sums for the metrics)."""
  rollout = scored.rollout
  logps, entropy = completion_logprobs(
      model_def, params, rollout, cfg.temperature, cfg.logprob_chunk_size, cfg.token_shards)
  old = jax.lax.stop_gradient(logps) if scored.old_logprobs is None else scored.old_logprobs
  token_loss, kl, ratio = per_token_loss(
      logps, old, scored.ref_logprobs, scored.advantages, cfg.clip_range, cfg.beta)
  mask = rollout.completion_mask.astype(jnp.float32)
  loss = aggregate_loss(token_loss, mask, cfg.loss_type, norms)
  low, high = cfg.clip_range
  adv = scored.advantages[:, None]
  is_low = ((ratio < low) & (adv < 0)).astype(jnp.float32)
  is_high = ((ratio > high) & (adv > 0)).astype(jnp.float32)
  per_token = (kl, entropy, is_low, is_high, is_low + is_high)
  token_sums = {name: jax.lax.stop_gradient(jnp.sum(v * mask))
                for name, v in zip(TOKEN_METRICS, per_token, strict=True)}
  return loss, token_sums
