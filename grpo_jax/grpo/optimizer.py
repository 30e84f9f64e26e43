"""The optimizer: AdamW with global-norm clipping and a learning-rate schedule."""

from __future__ import annotations

import jax
import optax

from grpo_jax.errors import ConfigError

# Weight decay applies to the matrices only (as HF Trainer's, and so TRL's, default): the
# models/transformer.py parameters named here. RMSNorm scales (`weight`) and q/k/v biases
# (`bias`) are left alone: decaying a norm scale pulls it towards 0 (not its init 1) and
# shrinks the activations. The choice is by name, not ndim: the layers are stacked on a
# leading axis, so a norm scale is [layers, D], 2-D like a matrix. LoRA's adapter matrices
# are decayed too (HF Trainer decays every trainable matrix, PEFT's included).
DECAYED_PARAMS = ("kernel", "embed_tokens", "lm_head", "lora_a", "lora_b")
UNDECAYED_PARAMS = ("weight", "bias")


def param_name(path) -> str:
  """The parameter's own name: the last dict key of its path (`...['q_proj']['kernel']`,
  then nnx's `.value` attribute)."""
  keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return str(keys[-1]) if keys else ""


def weight_decay_mask(params):
  """A pytree of bools like `params`: True for the matrices weight decay applies to."""
  return jax.tree_util.tree_map_with_path(lambda path, _: param_name(path) in DECAYED_PARAMS,
                                          params)


def make_optimizer(learning_rate: float, max_steps: int, *, warmup_steps: int = 0,
                   schedule: str = "linear", max_grad_norm: float = 1.0,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8):
  """AdamW with global-norm clipping and a learning-rate schedule: (tx, schedule_fn).

  weight_decay applies to the matrices only (`weight_decay_mask`). Without it (0) no mask
  is built, so the optimizer state has the layout it always had."""
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
      optax.adamw(schedule_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                  mask=weight_decay_mask if weight_decay else None))
  return tx, schedule_fn
