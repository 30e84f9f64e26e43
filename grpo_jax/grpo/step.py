"""The train step: scoring a rollout, micro-batched gradients, the update, GRPOStep."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from grpo_jax import sampling
from grpo_jax.errors import ConfigError
from grpo_jax.grpo.advantages import group_advantages, reward_metrics
from grpo_jax.grpo.logprobs import completion_logprobs
from grpo_jax.grpo.loss import (LossNormalizers, ScoredRollout, entropy_threshold, grpo_loss,
                                loss_mask, loss_metric_names, loss_normalizers)
from grpo_jax.grpo.types import GRPOConfig, TrainState, _psum
from grpo_jax.models import lora


def as_reference(params: nnx.State, compute_dtype):
  """The frozen reference as its forward passes read it: in the compute dtype where that is
  narrower than the stored one. A bfloat16 forward pass casts every weight before using
  it, so the copy gives exactly the same log-probs at half the memory."""
  narrow = lambda x: (x.astype(compute_dtype) if jnp.dtype(compute_dtype).itemsize
                      < jnp.dtype(x.dtype).itemsize else x)
  return jax.tree.map(narrow, params)


def init_train_state(params: nnx.State, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def policy_params(params, reference_params, reference_def=None):
  """The actor's whole state: `params` itself, or with LoRA (`reference_def` given: the
  base model's graphdef) the adapters `params` on the frozen base `reference_params`."""
  return params if reference_def is None else lora.policy_params(reference_params, params)


def score_rollout(state: TrainState, reference_params, model_def, rollout: sampling.Rollout,
                  rewards: jax.Array, cfg: GRPOConfig, axis_name=None, reference_def=None):
  """Advantages, old and reference log-probs, and the reward metrics of a rollout.

  `reference_def`: with LoRA, the base model's graphdef; the reference is then the base
  (`reference_params`) with the adapters off, and the actor the adapters on it. The
  log-probs are computed `cfg.score_micro_batch_size` rows at a time (0: all at once);
  rows are independent, so the result is the same."""
  adv = group_advantages(rewards, cfg.weights, cfg.num_generations, cfg.scale_rewards,
                         axis_name, cfg.multi_objective_aggregation)
  rows = rollout.prompt_ids.shape[0]
  size = cfg.token_shards * micro_batch_rows(rows // cfg.token_shards,
                                             cfg.score_micro_batch_size)

  def no_grad_logprobs(graph, p):
    logprobs = lambda part: completion_logprobs(graph, p, part, cfg.temperature,
                                                cfg.logprob_chunk_size, cfg.token_shards)[0]
    if size == rows:
      return jax.lax.stop_gradient(logprobs(rollout))
    parts = jax.lax.map(logprobs, split_rows(rollout, rows // size))
    return jax.lax.stop_gradient(join_rows(parts))

  old = (no_grad_logprobs(model_def, policy_params(state.params, reference_params,
                                                   reference_def))
         if cfg.num_iterations > 1 else None)
  ref = (no_grad_logprobs(reference_def or model_def, reference_params)
         if cfg.beta > 0 else None)
  rewarded = (~jnp.isnan(adv.rewards)).astype(jnp.float32)
  return ScoredRollout(rollout, adv.advantages, old, ref, rewarded), reward_metrics(
      rewards, adv, rollout, cfg.num_generations, axis_name)


def micro_batch_rows(rows: int, micro_batch_size: int) -> int:
  """Rows of one device per micro-batch: `micro_batch_size`, which must divide `rows`, or
  all of them for 0. (The trainer's `micro_batch_size=0` means "planned": the memory plan,
  `grpo_jax.memory`, resolves it to a number before the step is compiled.)"""
  if micro_batch_size and rows % micro_batch_size:
    raise ConfigError(f"micro_batch_size={micro_batch_size} must divide the {rows} "
                      "completions each device trains on")
  return micro_batch_size or rows


def split_rows(tree, parts: int):
  """[N, ...] -> [parts, N / parts, ...] for every leaf, part j holding rows j, j + parts,
  j + 2 parts, ...: on a mesh, where rows are split over the shards in contiguous blocks,
  every part is then spread evenly over all of them. `join_rows` undoes it."""
  split = lambda x: x.reshape((x.shape[0] // parts, parts) + x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, tree)


def join_rows(tree):
  """The inverse of `split_rows`: [parts, N / parts, ...] -> [N, ...]."""
  return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape((-1,) + x.shape[2:]), tree)


def loss_and_grads(params, model_def, scored: ScoredRollout, norms: LossNormalizers,
                   cfg: GRPOConfig, axis_name=None, base=None, dropout_key=None):
  """This device's (loss share, metric shares) and gradients, accumulated over micro-batches.

  Every row's loss share is normalised by whole-batch counts (`norms`), so the sum over
  micro-batches is exactly the loss of the whole batch (up to float summation order).
  `base`: with LoRA, the frozen base that the adapters `params` apply to (gradients are
  taken for the adapters alone). `dropout_key`: LoRA dropout's, one sub-key per micro-batch.
  """
  whole = (lambda p: p) if base is None else (lambda p: lora.policy_params(base, p))

  def loss(p, part_scored, part_norms, floor, key):
    return grpo_loss(whole(p), model_def, part_scored, part_norms, cfg, axis_name, floor, key)

  grad_fn = jax.value_and_grad(loss, has_aux=True)
  rollout = scored.rollout
  rows, shards = rollout.prompt_ids.shape[0], cfg.token_shards
  size = shards * micro_batch_rows(rows // shards, cfg.micro_batch_size)
  if size == rows:
    return grad_fn(params, scored, norms, None, dropout_key)
  entropy_floor = None
  if cfg.top_entropy_quantile < 1.0:
    # The threshold is the whole global batch's: one no-grad pass over all of its rows
    # (as the old and reference log-probs take), not a micro-batch's own quantile.
    entropy = jax.lax.stop_gradient(completion_logprobs(
        model_def, whole(params), rollout, cfg.temperature, cfg.logprob_chunk_size, shards)[1])
    entropy_floor = entropy_threshold(entropy, loss_mask(scored, cfg), cfg.top_entropy_quantile,
                                      axis_name)
  # Micro-batches spread over the shards (`split_rows`); per-row normalisers are split
  # with their rows.
  micro = split_rows((scored, norms.shard_tokens), rows // size)

  def accumulate(total, part):
    (part_scored, part_tokens), j = part
    out = grad_fn(params, part_scored, norms._replace(shard_tokens=part_tokens), entropy_floor,
                  None if dropout_key is None else jax.random.fold_in(dropout_key, j))
    return jax.tree.map(jnp.add, total, out), None

  # (loss, metric shares) and gradients start at zero: the shapes of grpo_loss's outputs.
  zero = jnp.zeros((), jnp.float32)
  zeros = ((zero, {name: zero for name in loss_metric_names(cfg)}),
           jax.tree.map(jnp.zeros_like, params))
  total, _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(rows // size)))
  return total


def skip_unless(ok: jax.Array, new: TrainState, old: TrainState) -> TrainState:
  """`new` where `ok`, else `old` (params, optimizer state and step all unchanged).

  `ok` is computed from psum-reduced values, so every device takes the same branch.
  """
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def dropout_key(cfg: GRPOConfig, updates: jax.Array, axis_name=None) -> jax.Array | None:
  """The train pass's LoRA dropout key for optimizer update number `updates` (on this
  device under pmap), or None without dropout: a function of the count alone, so a resumed
  run draws the masks an uninterrupted one draws."""
  if cfg.dropout_seed is None:
    return None
  key = jax.random.fold_in(jax.random.key(cfg.dropout_seed), updates)
  return key if axis_name is None else jax.random.fold_in(key, jax.lax.axis_index(axis_name))


def update(state: TrainState, scored: ScoredRollout, model_def, tx, schedule_fn,
           cfg: GRPOConfig, axis_name=None, base=None) -> tuple[TrainState, dict[str, jax.Array]]:
  """`cfg.num_iterations` optimizer updates on one scored rollout (lax.scan).

  An update whose loss or gradient norm is not finite, or whose batch has no valid reward
  at all, is skipped (`nonfinite_skipped` counts it): AdamW would otherwise spread one
  NaN into every weight and moment, or step on momentum alone. `base`: with LoRA, the
  frozen base the adapters (`state.params`) apply to.
  """
  norms = loss_normalizers(loss_mask(scored, cfg), axis_name, cfg.sampling.max_completion_length,
                           scored.rows_in_loss, cfg.token_shards)
  has_signal = (True if scored.rewarded_rows is None
                else _psum(jnp.sum(scored.rewarded_rows), axis_name) > 0)

  def one_update(state: TrainState, _):
    (loss, metric_shares), grads = loss_and_grads(
        state.params, model_def, scored, norms, cfg, axis_name, base,
        dropout_key(cfg, state.step, axis_name))
    grads, loss = _psum(grads, axis_name), _psum(loss, axis_name)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & has_signal
    metrics = {k: _psum(v, axis_name) for k, v in metric_shares.items()}
    metrics.update(loss=loss, grad_norm=grad_norm,
                   learning_rate=jnp.asarray(schedule_fn(state.step), jnp.float32),
                   nonfinite_skipped=(~ok).astype(jnp.float32))
    return skip_unless(ok, TrainState(state.step + 1, params, opt_state), state), metrics

  state, metrics = jax.lax.scan(one_update, state, None, length=cfg.num_iterations)
  skipped = jnp.sum(metrics.pop("nonfinite_skipped"))  # updates skipped, not their mean
  return state, {**jax.tree.map(jnp.mean, metrics), "nonfinite_skipped": skipped}


RewardFn = Callable[[sampling.Rollout], jax.Array]  # jittable: rollout -> [N] or [N, F]


@dataclasses.dataclass(frozen=True)
class GRPOStep:
  """The pure pieces of a GRPO step, bound to a model definition and an optimizer.

  Each method is a pure function of its array arguments; `axis_name` names the device
  axis when run under pmap (see `pmap.pmap_step`).
  """

  model_def: Any
  tx: optax.GradientTransformation
  schedule_fn: Callable
  cfg: GRPOConfig
  axis_name: str | None = None
  # LoRA: the base model's graphdef. `params` are then the adapters, and the reference
  # params the frozen base they apply to, read by both (see `policy_params`).
  reference_def: Any = None

  @property
  def uses_lora(self) -> bool:
    """Whether the step trains LoRA adapters on a frozen base (see `reference_def`)."""
    return self.reference_def is not None

  def policy_params(self, params, reference_params):
    """The actor's whole state, for sampling and evaluation (see `policy_params`)."""
    return policy_params(params, reference_params, self.reference_def)

  def generate(self, params, prompt_ids, prompt_mask, rng) -> sampling.Rollout:
    return sampling.generate(self.model_def, params, prompt_ids, prompt_mask, rng,
                             self.cfg.sampling, self.axis_name)

  def score(self, state: TrainState, reference_params, rollout: sampling.Rollout,
            rewards: jax.Array) -> tuple[ScoredRollout, dict[str, jax.Array]]:
    """Advantages, reference (and old) log-probs of a rewarded rollout, and reward metrics."""
    return score_rollout(state, reference_params, self.model_def, rollout, rewards, self.cfg,
                         self.axis_name, self.reference_def)

  def update(self, state: TrainState, scored: ScoredRollout, reference_params=None
             ) -> tuple[TrainState, dict[str, jax.Array]]:
    """The policy's optimizer updates on a scored rollout (`reference_params`: read with
    LoRA only, as the base the adapters apply to)."""
    if self.uses_lora and reference_params is None:
      raise ValueError("GRPOStep.update with LoRA needs the base (reference) params")
    base = reference_params if self.uses_lora else None
    return update(state, scored, self.model_def, self.tx, self.schedule_fn, self.cfg,
                  self.axis_name, base)

  def learn(self, state: TrainState, reference_params, rollout: sampling.Rollout,
            rewards: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    """Score a rewarded rollout and update the policy on it."""
    scored, metrics = self.score(state, reference_params, rollout, rewards)
    state, update_metrics = self.update(state, scored, reference_params)
    return state, {**metrics, **update_metrics}

  def train_step(self, state: TrainState, reference_params, batch, rng,
                 reward_fn: RewardFn) -> tuple[TrainState, dict[str, jax.Array]]:
    """Sample -> jittable rewards -> advantages -> clipped surrogate + KL -> AdamW, fused."""
    rollout = self.generate(self.policy_params(state.params, reference_params),
                            batch["prompt_ids"], batch["prompt_mask"], rng)
    return self.learn(state, reference_params, rollout, reward_fn(rollout))
