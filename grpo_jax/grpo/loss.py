"""The loss: importance weights (token / sequence / sequence_token), each loss_type's policy
term per token + beta * KL, the normalisation, and the loss metrics.

The formulas are TRL 1.16's (`GRPOTrainer._compute_loss`), term for term: where this file
and TRL differ, TRL is right, except for sequence_token (GSPO-token, from the GSPO paper;
TRL has no such level).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from grpo_jax import sampling
from grpo_jax.errors import ConfigError
from grpo_jax.grpo.logprobs import completion_logprobs
from grpo_jax.grpo.types import LOSS_TABLE, LOSS_TYPES, GRPOConfig, _psum

# Every metric some configuration's loss reports (`loss_metric_names`: which ones).
TOKEN_METRICS = ("kl", "entropy") + tuple(dict.fromkeys(
    m for kind in LOSS_TABLE.values() for m in kind.clip_metrics))


def log_importance_weights(logprobs, old_logprobs, mask, level: str):
  """log w: [N, L] for "token" and "sequence_token", [N, 1] for "sequence".

  sequence (GSPO): the masked mean of the completion's log-ratios (a completion without
  tokens: 0, TRL's clamp(min=1) of the count). sequence_token (GSPO-token): the sequence
  value with each token's own gradient, sg(seq) + logp_t - sg(logp_t).
  """
  log_ratio = logprobs - old_logprobs
  if level == "token":
    return log_ratio
  sequence = (jnp.sum(log_ratio * mask, -1, keepdims=True)
              / jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1.0))
  if level == "sequence":
    return sequence
  if level == "sequence_token":
    sg = jax.lax.stop_gradient
    return sg(sequence) + logprobs - sg(logprobs)
  raise ConfigError(f"importance_sampling_level={level!r}")


def entropy_threshold(entropy, mask, quantile: float, axis_name=None):
  """The (1 - quantile) quantile of the entropies of the mask's tokens over the global batch,
  interpolated linearly (torch.quantile's and NumPy's default); +inf without any token.

  Under pmap the other devices' tokens are gathered; under a mesh the arrays are global.
  """
  valid = mask > 0
  if axis_name is not None:
    entropy, valid = jax.lax.all_gather((entropy, valid), axis_name)
  values = jnp.sort(jnp.where(valid, entropy, jnp.inf).reshape(-1))  # the valid ones first
  count = jnp.sum(valid)
  last = jnp.maximum(count - 1, 0)
  rank = jnp.float32(1.0 - quantile) * last.astype(jnp.float32)
  below = jnp.minimum(jnp.floor(rank).astype(jnp.int32), last)
  above = jnp.minimum(below + 1, last)
  low, high = values[below], values[above]
  return jnp.where(count > 0, low + (rank - below) * (high - low), jnp.inf)


def _clipped_flags(coef, adv, cfg: GRPOConfig) -> tuple[jax.Array, ...]:
  low, high = cfg.clip_range
  is_low, is_high = (coef < low) & (adv < 0), (coef > high) & (adv > 0)
  return is_low, is_high, is_low | is_high


# By LossType.policy: the clip indicators its clip_metrics read, in their order.
_CLIP_FLAGS = {
    "clipped": _clipped_flags,
    "cispo": lambda coef, adv, cfg: ((coef > cfg.upper_epsilon) & (adv > 0),),
    "sapo": lambda coef, adv, cfg: (),
}


def clip_flags(coef, advantages, cfg: GRPOConfig) -> dict[str, jax.Array]:
  """TRL's clip indicators of each (token or sequence) ratio, by metric name."""
  kind = LOSS_TABLE[cfg.loss_type]
  return dict(zip(kind.clip_metrics, _CLIP_FLAGS[kind.policy](coef, advantages[:, None], cfg)))


def loss_metric_names(cfg: GRPOConfig) -> tuple[str, ...]:
  """The metrics the loss reports: no kl without a KL term (beta = 0, as TRL)."""
  return ((("kl",) if cfg.beta > 0 else ()) + ("entropy",)
          + LOSS_TABLE[cfg.loss_type].clip_metrics)


def _clipped_term(coef, adv, logprobs, cfg: GRPOConfig):
  """PPO's clipped surrogate."""
  del logprobs  # the ratio carries the gradient
  low, high = cfg.clip_range
  clipped = jnp.clip(coef, low, high)
  if cfg.delta is not None:  # two-sided clipping caps the unclipped branch (after coef_2)
    coef = jnp.minimum(coef, cfg.delta)
  return -jnp.minimum(coef * adv, clipped * adv), coef


def _cispo_term(coef, adv, logprobs, cfg: GRPOConfig):
  """The capped ratio weighs the log-prob's gradient, unclipped."""
  capped = jax.lax.stop_gradient(jnp.minimum(coef, cfg.upper_epsilon))
  return -capped * adv * logprobs, coef


def _sapo_term(coef, adv, logprobs, cfg: GRPOConfig):
  """A soft gate in place of the clip."""
  del logprobs
  tau = jnp.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
  return -jax.nn.sigmoid(tau * (coef - 1.0)) * (4.0 / tau) * adv, coef


_POLICY_TERMS = {"clipped": _clipped_term, "cispo": _cispo_term, "sapo": _sapo_term}


def policy_loss(coef, advantages, logprobs, cfg: GRPOConfig):
  """(the loss_type's policy term per token, the ratio its clip metrics read).

  coef: exp(log_importance_weights), [N, L] or [N, 1]; advantages [N].
  """
  term = _POLICY_TERMS[LOSS_TABLE[cfg.loss_type].policy]
  return term(coef, advantages[:, None], logprobs, cfg)


def per_token_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, cfg: GRPOConfig,
                   policy_mask=None):
  """Policy term (times `policy_mask`, the high-entropy tokens, if given) + beta * k3 KL.

  logprobs, old_logprobs, ref_logprobs (used only if beta > 0), mask: [N, L]; advantages [N].
  Returns (loss [N, L], kl [N, L] or None for beta = 0, coef_1 [N, L] or [N, 1]).
  """
  coef = jnp.exp(log_importance_weights(logprobs, old_logprobs, mask,
                                        cfg.importance_sampling_level))
  kl = None
  if cfg.beta > 0:
    delta = ref_logprobs - logprobs
    kl = jnp.exp(delta) - delta - 1.0
    if cfg.use_bias_correction_kl:  # through the ratio's gradient too, as TRL
      kl = kl * coef
  policy, coef = policy_loss(coef, advantages, logprobs, cfg)
  if policy_mask is not None:
    policy = policy * policy_mask
  loss = policy if kl is None else policy + cfg.beta * kl
  return jnp.broadcast_to(loss, logprobs.shape), kl, coef


class LossNormalizers(NamedTuple):
  """The counts the loss is normalised by, taken over the whole batch before it is split
  into micro-batches: every row's share of the loss then depends on nothing else."""

  num_shards: jax.Array  # devices (pmap) or data x fsdp shards (mesh): bnpo's mean over them
  global_rows: jax.Array
  global_tokens: jax.Array
  # [N] the loss tokens of the device (pmap) or shard (mesh) holding each row: bnpo's
  # per-device mean, as TRL's per process. Split into micro-batches like the rows.
  shard_tokens: jax.Array
  completion_length: jax.Array  # max_completion_length (dr_grpo), not the passes' width


def loss_normalizers(mask, axis_name, max_completion_length: int | None = None,
                     rows_in_loss: jax.Array | None = None,
                     token_shards: int = 1) -> LossNormalizers:
  """mask: the loss mask (`loss_mask`). max_completion_length: the configured one, when the
  passes run on fewer positions (a batch whose completions all stopped early); None: the
  mask's width. rows_in_loss: [N] 1.0 for rows the loss counts, 0.0 for filler rows; None:
  every row. token_shards: the contiguous blocks a mesh splits the rows into (1: pmap)."""
  mask = mask.astype(jnp.float32)
  rows = (jnp.float32(mask.shape[0]) if rows_in_loss is None
          else jnp.sum(rows_in_loss.astype(jnp.float32)))
  row_tokens = mask.sum(-1).reshape(token_shards, -1)
  shard_tokens = jnp.repeat(row_tokens.sum(-1), row_tokens.shape[1])
  return LossNormalizers(
      num_shards=_psum(jnp.float32(token_shards), axis_name),
      global_rows=_psum(rows, axis_name),
      global_tokens=_psum(mask.sum(), axis_name),
      shard_tokens=shard_tokens,
      completion_length=jnp.float32(max_completion_length or mask.shape[1]))


def aggregate_loss(token_loss, mask, loss_type: str, norms: LossNormalizers):
  """These rows' share of the global loss: the shares of all rows (over micro-batches and
  devices) sum to the loss. Rows without loss tokens add 0; they count in grpo's, sapo's and
  dr_grpo's row count unless left out by rows_in_loss (TRL's masked truncated rows do)."""
  if loss_type not in LOSS_TABLE:
    raise ConfigError(f"loss_type={loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")
  mask = mask.astype(jnp.float32)
  row_sums = jnp.sum(token_loss * mask, -1)
  return _AGGREGATIONS[LOSS_TABLE[loss_type].aggregation](row_sums, mask, norms)


# By LossType.aggregation: these rows' share of the loss from their row sums.
_AGGREGATIONS = {
    "sequence_mean": lambda row_sums, mask, norms: jnp.sum(
        row_sums / jnp.maximum(mask.sum(-1), 1.0)) / norms.global_rows,
    "shard_token_mean": lambda row_sums, mask, norms: jnp.sum(
        row_sums / jnp.maximum(norms.shard_tokens, 1.0)) / norms.num_shards,
    "fixed_length": lambda row_sums, mask, norms: jnp.sum(row_sums) / (
        norms.global_rows * norms.completion_length),
    "token_mean": lambda row_sums, mask, norms: jnp.sum(row_sums) / jnp.maximum(
        norms.global_tokens, 1.0),
}


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


def loss_mask(scored: ScoredRollout, cfg: GRPOConfig) -> jax.Array:
  """[N, L] float32: the tokens the loss (and its token counts and metrics) is over.

  mask_truncated_completions leaves out completions that did not end with EOS (the
  sampler's flag: an EOS in the last slot is not a truncation); filler rows are out; so
  are tool-response tokens (multi-turn rollouts): only the model's own tokens count.
  """
  rollout = scored.rollout
  mask = sampling.model_token_mask(rollout).astype(jnp.float32)
  if cfg.mask_truncated_completions:
    mask = mask * rollout.eos_terminated[:, None]
  if scored.rows_in_loss is not None:
    mask = mask * scored.rows_in_loss[:, None]
  return mask


def loss_from_logprobs(logprobs, entropy, scored: ScoredRollout, norms: LossNormalizers,
                       cfg: GRPOConfig, axis_name=None, entropy_floor=None):
  """(these rows' share of the loss, their shares of the metrics) from their current
  log-probs and entropies [N, L]. entropy_floor: the top_entropy_quantile threshold of the
  global batch when these rows are only part of it (micro-batches); None: computed here."""
  mask = loss_mask(scored, cfg)
  entropy = jax.lax.stop_gradient(entropy)
  old = (jax.lax.stop_gradient(logprobs) if scored.old_logprobs is None
         else scored.old_logprobs)
  policy_mask = None
  if cfg.top_entropy_quantile < 1.0:
    if entropy_floor is None:
      entropy_floor = entropy_threshold(entropy, mask, cfg.top_entropy_quantile, axis_name)
    policy_mask = ((entropy >= entropy_floor) & (mask > 0)).astype(jnp.float32)
  token_loss, kl, coef = per_token_loss(logprobs, old, scored.ref_logprobs, scored.advantages,
                                        mask, cfg, policy_mask)
  loss = aggregate_loss(token_loss, mask, cfg.loss_type, norms)

  # Each metric's share: over all rows (micro-batches, devices) they sum to TRL's means,
  # over loss tokens, or over rows for a sequence-level ratio ([N, 1]).
  rows = (jnp.ones(mask.shape[0]) if scored.rows_in_loss is None
          else scored.rows_in_loss.astype(jnp.float32))
  token_mean = lambda x: jnp.sum(x * mask) / jnp.maximum(norms.global_tokens, 1.0)
  row_mean = lambda x: jnp.sum(x[:, 0] * rows) / jnp.maximum(norms.global_rows, 1.0)
  metrics = {"entropy": token_mean(entropy)}
  if kl is not None:
    metrics["kl"] = token_mean(kl)
  for name, flag in clip_flags(coef, scored.advantages, cfg).items():
    metrics[name] = (row_mean if flag.shape[1] == 1 else token_mean)(flag.astype(jnp.float32))
  return loss, jax.lax.stop_gradient(metrics)


def grpo_loss(params, model_def, scored: ScoredRollout, norms: LossNormalizers,
              cfg: GRPOConfig, axis_name=None, entropy_floor=None, dropout_key=None):
  """(this device's share of the loss, its shares of the metrics) under `params`."""
  logprobs, entropy = completion_logprobs(model_def, params, scored.rollout, cfg.temperature,
                                          cfg.logprob_chunk_size, cfg.token_shards,
                                          dropout_key, cfg.remat)
  return loss_from_logprobs(logprobs, entropy, scored, norms, cfg, axis_name, entropy_floor)
