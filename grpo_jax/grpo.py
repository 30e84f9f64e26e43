"""GRPO as pure functions: advantages, per-token log-probs, the loss, and the train step.

Everything here is arrays in, arrays out, and runs under `jax.jit` / `jax.pmap`. Under
pmap each device holds whole groups of G completions; functions that need global
statistics take `axis_name` and reduce over it (None: a single device, no collectives).

Loss normalisation is written so that the *sum over devices* of each device's share is
the loss of the whole global batch; gradients are therefore `psum`-reduced and the
result does not depend on how many devices the batch is split over (except for
`loss_type="bnpo"`, which by definition normalises per device, as TRL does per process).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from grpo_jax import sampling
from grpo_jax.errors import ConfigError
from grpo_jax.models import sharding
from grpo_jax.models.transformer import positions_from_mask

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Static hyperparameters of one GRPO step. Validated on construction."""

  sampling: sampling.SamplingConfig
  beta: float = 0.04
  epsilon: float = 0.2
  epsilon_high: float | None = None  # None: same as epsilon
  loss_type: str = "grpo"
  scale_rewards: str = "group"
  reward_weights: tuple[float, ...] | None = None  # None: every reward function weighs 1
  num_reward_funcs: int = 1
  num_iterations: int = 1  # optimizer updates per sampled batch (GRPO's mu)
  logprob_chunk_size: int = 0  # vocabulary entries per log-prob chunk; 0: auto
  # Completions per forward/backward pass of the train step on each device (gradients
  # are accumulated over the micro-batches); 0: auto, about MICRO_BATCH_TOKENS tokens.
  micro_batch_size: int = 0
  # The platform the step is compiled for ("cpu", "tpu", "gpu"; None: the default backend
  # when this config is built). Auto micro-batching depends on it; a step compiled on a CPU
  # host for a TPU slice (grpo_jax.plan) must not decide from the host.
  platform: str | None = None
  # How many ways the token rows of a batch are split over devices inside one program:
  # 1 under pmap and on one device (each program sees its own rows), data x fsdp in mesh
  # mode (the program sees the global batch). Per-device sizes (log-prob chunks,
  # micro-batches) are taken from one shard's rows.
  token_shards: int = 1

  def __post_init__(self):
    if self.platform is None:
      object.__setattr__(self, "platform", jax.default_backend())
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
    if self.num_iterations < 1:
      raise ConfigError(f"num_iterations={self.num_iterations}; must be >= 1")
    if self.num_reward_funcs < 1:
      raise ConfigError(f"num_reward_funcs={self.num_reward_funcs}; must be >= 1")
    if self.reward_weights is not None and len(self.reward_weights) != self.num_reward_funcs:
      raise ConfigError(
          f"reward_weights has {len(self.reward_weights)} entries but there are "
          f"{self.num_reward_funcs} reward functions; give one weight per function")
    if self.micro_batch_size < 0:
      raise ConfigError(f"micro_batch_size={self.micro_batch_size}; must be >= 0 (0: auto)")
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
  def clip_range(self) -> tuple[float, float]:
    high = self.epsilon if self.epsilon_high is None else self.epsilon_high
    return 1.0 - self.epsilon, 1.0 + high

  @property
  def weights(self) -> tuple[float, ...]:
    return self.reward_weights or (1.0,) * self.num_reward_funcs


class TrainState(NamedTuple):
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


# --------------------------------------------------------------------------- advantages


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


# ------------------------------------------------------------------------- log-probs


# float32 logits of one chunk when logprob_chunk_size = 0. The update's scratch memory grows
# by ~4x this (150k vocabulary: 538 MiB at 16 MiB, 730 MiB at 64 MiB, for a 5% slower
# update).
LOGITS_CHUNK_BYTES = 16 * 2**20


def vocab_chunk_size(chunk_size: int, tokens: int, vocab_size: int) -> int:
  """Vocabulary entries per chunk: `chunk_size`, or for 0 as many as keep one chunk's
  [tokens, chunk] float32 logits within LOGITS_CHUNK_BYTES (at least 128)."""
  size = chunk_size or max(128, LOGITS_CHUNK_BYTES // (4 * max(tokens, 1)))
  return min(size, vocab_size)


def _vocab_chunks(vocab_size: int, chunk: int):
  """(number of chunks, start of chunk c, mask of the entries chunk c owns).

  The last chunk is moved back to end at V (its start is clamped) rather than padded:
  padding would copy the whole [V, D] head. The entries it shares with the chunk before
  are owned by that chunk, and masked out of this one.
  """
  count = -(-vocab_size // chunk)
  start = lambda c: jnp.minimum(c * chunk, vocab_size - chunk)
  owned = lambda c: start(c) + jnp.arange(chunk) >= c * chunk
  return count, start, owned


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused_logprobs(hidden, head, targets, temperature, chunk):
  """(log-prob of each target, entropy) under softmax(hidden @ head.T / temperature).

  hidden [M, D], head [V, D], targets [M] -> ([M], [M]) float32, in one pass over the
  vocabulary `chunk` entries at a time with an online log-sum-exp: [M, V] logits never
  exist. The backward pass (below) recomputes each chunk's logits once and writes that
  chunk's rows of the head gradient in place.
  """
  return _fused_forward(hidden, head, targets, temperature, chunk)[0]


def _chunk_logits(hidden, head, targets, c, temperature, chunk):
  """Chunk c's (logits [M, chunk], head rows, start, owned [chunk], target hits [M, chunk]);
  a hit is an owned entry that is the row's target."""
  _, start, owned = _vocab_chunks(head.shape[0], chunk)
  start, owned = start(c), owned(c)
  w = jax.lax.dynamic_slice_in_dim(head, start, chunk, axis=0)
  logits = jnp.einsum("md,vd->mv", hidden, w.astype(hidden.dtype),
                      preferred_element_type=jnp.float32) / temperature
  hit = ((start + jnp.arange(chunk))[None] == targets[:, None]) & owned[None]
  return logits, w, start, owned, hit


def _fused_forward(hidden, head, targets, temperature, chunk):
  count = _vocab_chunks(head.shape[0], chunk)[0]
  m = hidden.shape[0]

  def body(c, carry):
    top, total, weighted, picked = carry  # running max, sum exp, sum exp * logit, target logit
    logits, _, _, owned, hit = _chunk_logits(hidden, head, targets, c, temperature, chunk)
    logits = jnp.where(owned[None], logits, -jnp.inf)
    new_top = jnp.maximum(top, logits.max(-1))
    scale = jnp.exp(top - new_top)
    e = jnp.exp(logits - new_top[:, None])  # 0 where not owned
    total = total * scale + e.sum(-1)
    weighted = weighted * scale + jnp.sum(e * jnp.where(owned[None], logits, 0.0), -1)
    picked = picked + jnp.sum(jnp.where(hit, logits, 0.0), -1)
    return new_top, total, weighted, picked

  init = (jnp.full((m,), -jnp.inf, jnp.float32), jnp.zeros((m,), jnp.float32),
          jnp.zeros((m,), jnp.float32), jnp.zeros((m,), jnp.float32))
  top, total, weighted, picked = jax.lax.fori_loop(0, count, body, init)
  log_z = top + jnp.log(total)
  mean_logit = weighted / total  # sum p * logit
  return (picked - log_z, log_z - mean_logit), (log_z, mean_logit)


def _fused_fwd(hidden, head, targets, temperature, chunk):
  out, (log_z, mean_logit) = _fused_forward(hidden, head, targets, temperature, chunk)
  return out, (hidden, head, targets, log_z, mean_logit)


def _fused_bwd(temperature, chunk, residuals, cotangents):
  hidden, head, targets, log_z, mean_logit = residuals
  g_logp, g_entropy = cotangents
  count = _vocab_chunks(head.shape[0], chunk)[0]

  def body(c, carry):
    d_hidden, d_head = carry
    logits, w, start, owned, hit = _chunk_logits(hidden, head, targets, c, temperature, chunk)
    probs = jnp.where(owned[None], jnp.exp(logits - log_z[:, None]), 0.0)
    # d logp / d logit_j = 1[j = target] - p_j;  d entropy / d logit_j = -p_j (logit_j - mean)
    d_logits = (g_logp[:, None] * (hit - probs)
                - g_entropy[:, None] * probs * (logits - mean_logit[:, None])) / temperature
    d_logits = jnp.where(owned[None], d_logits, 0.0).astype(hidden.dtype)
    d_hidden = d_hidden + jnp.einsum("mv,vd->md", d_logits, w.astype(hidden.dtype),
                                     preferred_element_type=jnp.float32)
    d_w = jnp.einsum("mv,md->vd", d_logits, hidden, preferred_element_type=jnp.float32)
    # Rows this chunk does not own keep what the chunk before wrote there.
    d_w = jnp.where(owned[:, None], d_w,
                    jax.lax.dynamic_slice_in_dim(d_head, start, chunk, axis=0))
    # On a mesh the chunk's gradient is summed over the batch shards straight into the
    # head's layout (a reduce-scatter), and the [V, D] gradient is never held whole.
    d_w = sharding.constrain(d_w.astype(d_head.dtype), None, "fsdp")
    return sharding.rows(d_hidden), head_layout(
        jax.lax.dynamic_update_slice_in_dim(d_head, d_w, start, axis=0))

  head_layout = lambda x: sharding.constrain(x, "tensor", "fsdp")
  init = (sharding.rows(jnp.zeros(hidden.shape, jnp.float32)),
          head_layout(jnp.zeros(head.shape, head.dtype)))
  d_hidden, d_head = jax.lax.fori_loop(0, count, body, init)
  return d_hidden.astype(hidden.dtype), d_head, None


_fused_logprobs.defvjp(_fused_fwd, _fused_bwd)


def token_logprobs(hidden: jax.Array, head_weight: jax.Array, targets: jax.Array,
                   temperature: float, chunk_size: int, token_shards: int = 1
                   ) -> tuple[jax.Array, jax.Array]:
  """Log-probs of `targets` and entropies under softmax(hidden @ head.T / temperature).

  hidden: [N, T, D], head_weight: [V, D], targets: [N, T] -> ([N, T], [N, T]) float32.
  Fused and chunked over the vocabulary (`_fused_logprobs`): the [N, T, V] logits never
  exist, each chunk's logits are computed once forward and once backward, and the head's
  gradient is written once, chunk by chunk (no [V, D] temporary per chunk).
  `chunk_size`: vocabulary entries per chunk; 0 sizes it from one device's share of the
  tokens (`vocab_chunk_size`; the rows are split `token_shards` ways).
  """
  n, t, d = hidden.shape
  # Token rows [N * T, D], not [N, T, D]: the matmuls and their gradients need no transposes.
  chunk = vocab_chunk_size(chunk_size, n * t // token_shards, head_weight.shape[0])
  logp, entropy = _fused_logprobs(sharding.rows(hidden.reshape(n * t, d)), head_weight,
                                  sharding.rows(targets.reshape(n * t).astype(jnp.int32)),
                                  temperature, chunk)
  return logp.reshape(n, t), entropy.reshape(n, t)


def completion_logprobs(model_def: nnx.GraphDef, params: nnx.State, rollout: sampling.Rollout,
                        temperature: float, chunk_size: int, token_shards: int = 1
                        ) -> tuple[jax.Array, jax.Array]:
  """Per-token log-probs and entropies [N, L] of the completion tokens under `params`."""
  model = nnx.merge(model_def, params)
  ids = jnp.concatenate([rollout.prompt_ids, rollout.completion_ids], axis=1)
  mask = jnp.concatenate([rollout.prompt_mask, rollout.completion_mask], axis=1)
  hidden, _ = model.hidden_states(ids, positions_from_mask(mask), mask)
  prompt_len, length = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
  # The hidden state at position p predicts token p + 1: keep only those that predict completions.
  hidden = hidden[:, prompt_len - 1:prompt_len - 1 + length]
  return token_logprobs(hidden, model.head_weight, rollout.completion_ids, temperature,
                        chunk_size, token_shards)


# ----------------------------------------------------------------------------- loss


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


def loss_normalizers(completion_mask, axis_name) -> LossNormalizers:
  mask = completion_mask.astype(jnp.float32)
  return LossNormalizers(
      num_devices=_psum(jnp.float32(1.0), axis_name),
      global_rows=_psum(jnp.float32(mask.shape[0]), axis_name),
      global_tokens=_psum(mask.sum(), axis_name),
      device_tokens=mask.sum())


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
    return masked_sum / (norms.global_rows * mask.shape[1])
  if loss_type == "dapo":
    return masked_sum / jnp.maximum(norms.global_tokens, 1.0)
  raise ConfigError(f"loss_type={loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")


class ScoredRollout(NamedTuple):
  """A rollout with everything the loss needs that does not depend on the current params."""

  rollout: sampling.Rollout
  advantages: jax.Array  # [N]
  old_logprobs: jax.Array | None  # [N, L]; None: num_iterations == 1 (ratio is exactly 1)
  ref_logprobs: jax.Array | None  # [N, L]; None: beta == 0


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


# ----------------------------------------------------------------------- train step


def make_optimizer(learning_rate: float, max_steps: int, *, warmup_steps: int = 0,
                   schedule: str = "linear", max_grad_norm: float = 1.0,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8):
  """AdamW with global-norm clipping and a learning-rate schedule: (tx, schedule_fn)."""
  decay_steps = max(max_steps - warmup_steps, 1)
  if schedule == "constant":
    after = optax.constant_schedule(learning_rate)
  elif schedule == "linear":
    after = optax.linear_schedule(learning_rate, 0.0, decay_steps)
  elif schedule == "cosine":
    after = optax.cosine_decay_schedule(learning_rate, decay_steps)
  else:
    raise ConfigError(f"lr_scheduler_type={schedule!r}; allowed: constant, linear, cosine")
  schedule_fn = optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup_steps), after], [warmup_steps]
  ) if warmup_steps else after
  tx = optax.chain(
      optax.clip_by_global_norm(max_grad_norm) if max_grad_norm else optax.identity(),
      optax.adamw(schedule_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return tx, schedule_fn


def as_reference(params: nnx.State, compute_dtype):
  """The frozen reference as its forward passes read it: in the compute dtype where that is
  narrower than the stored one. A bfloat16 forward pass casts every weight before using
  it, so the copy gives exactly the same log-probs at half the memory."""
  narrow = lambda x: (x.astype(compute_dtype) if jnp.dtype(compute_dtype).itemsize
                      < jnp.dtype(x.dtype).itemsize else x)
  return jax.tree.map(narrow, params)


def init_train_state(params: nnx.State, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def score_rollout(state: TrainState, reference_params, model_def, rollout: sampling.Rollout,
                  rewards: jax.Array, cfg: GRPOConfig, axis_name=None):
  """Advantages, old and reference log-probs, and the reward metrics of a rollout."""
  adv = group_advantages(rewards, cfg.weights, cfg.num_generations, cfg.scale_rewards,
                         axis_name)
  no_grad_logprobs = lambda p: jax.lax.stop_gradient(completion_logprobs(
      model_def, p, rollout, cfg.temperature, cfg.logprob_chunk_size, cfg.token_shards)[0])
  old = no_grad_logprobs(state.params) if cfg.num_iterations > 1 else None
  ref = no_grad_logprobs(reference_params) if cfg.beta > 0 else None
  return ScoredRollout(rollout, adv.advantages, old, ref), reward_metrics(
      rewards, adv, rollout, cfg.num_generations, axis_name)


def reward_metrics(rewards, adv: Advantages, rollout: sampling.Rollout, num_generations: int,
                   axis_name=None) -> dict[str, jax.Array]:
  """Global reward / completion statistics (TRL's names)."""
  if rewards.ndim == 1:
    rewards = rewards[:, None]
  func_mean, func_std = _nan_mean_std(rewards.astype(jnp.float32), axis=0, axis_name=axis_name)
  reward_mean, _ = _nan_mean_std(adv.rewards, axis=0, axis_name=axis_name)
  group_std = adv.group_std.reshape(-1, num_generations)[:, 0]
  num_groups = _psum(jnp.float32(group_std.shape[0]), axis_name)
  lengths = rollout.completion_mask.sum(-1).astype(jnp.float32)
  rows = _psum(jnp.float32(lengths.shape[0]), axis_name)
  return {
      "reward": reward_mean[0],
      "reward_std": _psum(group_std.sum(), axis_name) / num_groups,
      "frac_reward_zero_std": _psum(jnp.sum(group_std < 1e-6), axis_name) / num_groups,
      "rewards_per_func/mean": func_mean[0],
      "rewards_per_func/std": func_std[0],
      "completions/mean_length": _psum(lengths.sum(), axis_name) / rows,
      "completions/clipped_ratio":
          _psum(jnp.sum(~rollout.eos_terminated), axis_name) / rows,
  }


MICRO_BATCH_TOKENS = 1024  # prompt + completion tokens per micro-batch when micro_batch_size = 0
MICRO_BATCH_MAX_PARAMS = 32_000_000  # auto micro-batching: models up to this size


def micro_batch_rows(rows: int, seq_len: int, micro_batch_size: int, num_params: int = 0,
                     platform: str = "cpu") -> int:
  """Rows of one device per micro-batch: `micro_batch_size`, or for 0 (auto) on CPU
  (`platform`: the one the step is compiled for) the largest divisor
  of `rows` that keeps a micro-batch within MICRO_BATCH_TOKENS tokens (at least one row).

  On CPU a micro-batch of ~1k tokens keeps the train pass's activations in cache: the
  backward pass ran 1.15x (4k-token batch) to 1.6x (3.8k-token batch of a tiny model)
  faster than on the whole batch at once. Each micro-batch adds a whole parameter
  gradient, though: with 40M parameters (a 150k vocabulary) the update ran 10% slower, so
  auto leaves models over MICRO_BATCH_MAX_PARAMS, and accelerators, on the whole batch.
  """
  if micro_batch_size:
    if rows % micro_batch_size:
      raise ConfigError(f"micro_batch_size={micro_batch_size} must divide the {rows} "
                        "completions each device trains on")
    return micro_batch_size
  if platform != "cpu" or num_params > MICRO_BATCH_MAX_PARAMS:
    return rows
  fits = max(1, MICRO_BATCH_TOKENS // seq_len)
  return max(d for d in range(1, rows + 1) if rows % d == 0 and d <= fits)


def loss_and_grads(params, model_def, scored: ScoredRollout, norms: LossNormalizers,
                   cfg: GRPOConfig, axis_name=None):
  """This device's (loss share, token sums) and gradients, accumulated over micro-batches.

  Every row's loss share is normalised by whole-batch counts (`norms`), so the sum over
  micro-batches is exactly the loss of the whole batch (up to float summation order).
  """
  grad_fn = jax.value_and_grad(grpo_loss, has_aux=True)
  rollout = scored.rollout
  rows, shards = rollout.prompt_ids.shape[0], cfg.token_shards
  seq_len = rollout.prompt_ids.shape[1] + rollout.completion_ids.shape[1]
  num_params = sum(x.size for x in jax.tree.leaves(params))
  size = shards * micro_batch_rows(rows // shards, seq_len, cfg.micro_batch_size, num_params,
                                   cfg.platform)
  if size == rows:
    return grad_fn(params, model_def, scored, norms, cfg, axis_name)
  # Micro-batch j holds rows j, j + k, j + 2k, ... (k micro-batches): on a mesh, where the
  # rows are split in contiguous blocks over the shards, every micro-batch is then spread
  # evenly over all of them.
  micro = jax.tree.map(
      lambda x: x.reshape((size, rows // size) + x.shape[1:]).swapaxes(0, 1), scored)

  def accumulate(total, part):
    out = grad_fn(params, model_def, part, norms, cfg, axis_name)
    return jax.tree.map(jnp.add, total, out), None

  # (loss, token sums) and gradients start at zero: the shapes of grpo_loss's outputs.
  zero = jnp.zeros((), jnp.float32)
  zeros = ((zero, {name: zero for name in TOKEN_METRICS}), jax.tree.map(jnp.zeros_like, params))
  total, _ = jax.lax.scan(accumulate, zeros, micro)
  return total


def update(state: TrainState, scored: ScoredRollout, model_def, tx, schedule_fn,
           cfg: GRPOConfig, axis_name=None) -> tuple[TrainState, dict[str, jax.Array]]:
  """`cfg.num_iterations` optimizer updates on one scored rollout (lax.scan)."""
  norms = loss_normalizers(scored.rollout.completion_mask, axis_name)

  def one_update(state: TrainState, _):
    (loss, token_sums), grads = loss_and_grads(state.params, model_def, scored, norms, cfg,
                                               axis_name)
    grads = _psum(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {k: _psum(v, axis_name) / jnp.maximum(norms.global_tokens, 1.0)
               for k, v in token_sums.items()}
    metrics.update(loss=_psum(loss, axis_name), grad_norm=optax.global_norm(grads),
                   learning_rate=jnp.asarray(schedule_fn(state.step), jnp.float32))
    return TrainState(state.step + 1, params, opt_state), metrics

  state, metrics = jax.lax.scan(one_update, state, None, length=cfg.num_iterations)
  return state, jax.tree.map(jnp.mean, metrics)


RewardFn = Callable[[sampling.Rollout], jax.Array]  # jittable: rollout -> [N] or [N, F]


@dataclasses.dataclass(frozen=True)
class GRPOStep:
  """The pure pieces of a GRPO step, bound to a model definition and an optimizer.

  Each method is a pure function of its array arguments; `axis_name` names the device
  axis when run under pmap (see `parallel.pmap_step`).
  """

  model_def: Any
  tx: optax.GradientTransformation
  schedule_fn: Callable
  cfg: GRPOConfig
  axis_name: str | None = None

  def generate(self, params, prompt_ids, prompt_mask, rng) -> sampling.Rollout:
    return sampling.generate(self.model_def, params, prompt_ids, prompt_mask, rng,
                             self.cfg.sampling, self.axis_name)

  def score(self, state: TrainState, reference_params, rollout: sampling.Rollout,
            rewards: jax.Array) -> tuple[ScoredRollout, dict[str, jax.Array]]:
    """Advantages, reference (and old) log-probs of a rewarded rollout, and reward metrics."""
    return score_rollout(state, reference_params, self.model_def, rollout, rewards, self.cfg,
                         self.axis_name)

  def update(self, state: TrainState, scored: ScoredRollout
             ) -> tuple[TrainState, dict[str, jax.Array]]:
    """The policy's optimizer updates on a scored rollout."""
    return update(state, scored, self.model_def, self.tx, self.schedule_fn, self.cfg,
                  self.axis_name)

  def learn(self, state: TrainState, reference_params, rollout: sampling.Rollout,
            rewards: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    """Score a rewarded rollout and update the policy on it."""
    scored, metrics = self.score(state, reference_params, rollout, rewards)
    state, update_metrics = self.update(state, scored)
    return state, {**metrics, **update_metrics}

  def train_step(self, state: TrainState, reference_params, batch, rng,
                 reward_fn: RewardFn) -> tuple[TrainState, dict[str, jax.Array]]:
    """Sample -> jittable rewards -> advantages -> clipped surrogate + KL -> AdamW, fused."""
    rollout = self.generate(state.params, batch["prompt_ids"], batch["prompt_mask"], rng)
    return self.learn(state, reference_params, rollout, reward_fn(rollout))
