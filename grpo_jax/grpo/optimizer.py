"""The optimizer: AdamW with global-norm clipping and a learning-rate schedule."""

from __future__ import annotations

import optax

from grpo_jax.errors import ConfigError


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
