"""One validation pass over a config (`validate`): unknown fields (with the closest known
name), then every value against what it allows, in one line each."""

from __future__ import annotations

import difflib
import math

import ml_collections

from grpo_jax.config.defaults import EXPORT_FORMATS, LR_SCHEDULES, PARALLELISM, base_config
from grpo_jax.config.step import grpo_config, reward_func_specs
from grpo_jax.errors import ConfigError
from grpo_jax.models import attention, lora
from grpo_jax.tools.calls import FORMATS as TOOL_CALL_FORMATS

def _require(ok: bool, field: str, value, allowed: str):
  if not ok:
    raise ConfigError(f"config.{field}={value!r}; allowed: {allowed}")


def unknown_field(name: str, known, group: str = "", where: str = "") -> str:
  """'unknown config field ...; did you mean ...?' (the closest known names), then the
  known ones."""
  full = f"{group}.{name}" if group else name
  close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
  guess = f"; did you mean {f'{group}.{close[0]}' if group else close[0]!r}?" if close else ""
  return (f"unknown config field {full!r}{where}{guess} (known fields"
          f"{' of ' + group if group else ''}: {', '.join(sorted(known))})")


def check_known_fields(config: ml_collections.ConfigDict) -> None:
  """Unknown fields (typos in a config file) are errors, not silently ignored."""
  known = base_config()
  for key in config.keys():
    if key not in known:
      raise ConfigError(unknown_field(key, known))
  for group in ("model", "mesh", "lora"):
    for key in config[group].keys():
      if key not in known[group]:
        raise ConfigError(unknown_field(key, known[group], group))


def unknown_override(argv: list[str]) -> str:
  """Describes the first `--config.FIELD=...` argument whose FIELD the schema lacks."""
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    node = base_config()
    for i, part in enumerate(path.split(".")):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        parent = ".".join(path.split(".")[:i])
        known = sorted(node) if isinstance(node, ml_collections.ConfigDict) else []
        return unknown_field(part, known, parent, f" (in {arg})")
      node = node[part]
  return "unknown config field on the command line"


def _floats(config, prefix: str = ""):
  """(dotted name, value) of every float field, nested ConfigDicts included."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _floats(value, f"{prefix}{key}.")
    elif isinstance(value, float):
      yield f"{prefix}{key}", value


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field once, before anything is built; errors name the field."""
  check_known_fields(config)
  for field, value in _floats(config):  # nan compares false everywhere: 'beta=nan' acted as 0
    _require(math.isfinite(value), field, value, "a finite number")
  _require(isinstance(config.seed, int) and 0 <= config.seed < 2**63, "seed", config.seed,
           "an integer from 0 to 2**63 - 1")
  _require(config.top_k >= 0, "top_k", config.top_k, "an integer >= 0 (0: off)")
  positive = ("num_generations", "prompts_per_step", "max_prompt_length",
              "max_completion_length", "max_steps", "log_every", "keep_checkpoints",
              "num_iterations", "sft_batch_size", "max_nonfinite_steps", "ref_model_sync_steps",
              "max_num_gen_batches", "max_tool_calling_iterations")
  for field in positive:
    _require(int(config[field]) >= 1, field, config[field], "an integer >= 1")
  for field in ("eval_every", "checkpoint_every"):
    _require(int(config[field]) >= 0, field, config[field], "an integer >= 0 (0: never)")
  _require(config.num_generations >= 2, "num_generations", config.num_generations,
           "an integer >= 2 (GRPO compares each answer with its siblings)")
  _require(config.sft_steps >= 0, "sft_steps", config.sft_steps, "an integer >= 0")
  _require(config.micro_batch_size >= 0, "micro_batch_size", config.micro_batch_size,
           "an integer >= 0 (0: chosen by the memory plan)")
  _require(config.memory_limit_gib >= 0, "memory_limit_gib", config.memory_limit_gib,
           "GiB per device, a number >= 0 (0: the device's own memory)")
  _require(config.train_length_bucket >= 0, "train_length_bucket", config.train_length_bucket,
           "an integer >= 0 (0: the passes always run on max_completion_length)")
  _require(config.logprob_chunk_size >= 0, "logprob_chunk_size", config.logprob_chunk_size,
           "an integer >= 0 (0: sized from the vocabulary)")
  _require(0 <= config.ref_model_mixup_alpha <= 1, "ref_model_mixup_alpha",
           config.ref_model_mixup_alpha, "0 <= x <= 1")
  _require(0 <= config.soft_punish_cache <= config.max_completion_length, "soft_punish_cache",
           config.soft_punish_cache, f"0 <= x <= max_completion_length="
           f"{config.max_completion_length} (0: a fifth of it)")
  _require(config.eval_size >= 0, "eval_size", config.eval_size, "an integer >= 0")
  _require(config.eval_batch_size >= 0, "eval_batch_size", config.eval_batch_size,
           "an integer >= 0 (0: every held-out prompt at once)")
  _require(config.max_train_minutes >= 0, "max_train_minutes", config.max_train_minutes,
           "minutes, a number >= 0 (0: no time budget)")
  _require(config.learning_rate > 0, "learning_rate", config.learning_rate, "a number > 0")
  _require(0 <= config.warmup_ratio < 1, "warmup_ratio", config.warmup_ratio, "0 <= x < 1")
  # optax accepts all of these out of range: a negative clip norm flips the update.
  _require(config.max_grad_norm >= 0, "max_grad_norm", config.max_grad_norm,
           "a number >= 0 (0: no clipping)")
  _require(config.weight_decay >= 0, "weight_decay", config.weight_decay, "a number >= 0")
  for field in ("adam_beta1", "adam_beta2"):
    _require(0 <= config[field] < 1, field, config[field], "0 <= x < 1")
  _require(config.reward_timeout_seconds >= 0, "reward_timeout_seconds",
           config.reward_timeout_seconds, "seconds, a number >= 0 (0: no limit)")
  _require(config.tool_timeout_seconds > 0, "tool_timeout_seconds", config.tool_timeout_seconds,
           "a number of seconds > 0")
  _require(config.tool_call_format in TOOL_CALL_FORMATS or ":" in config.tool_call_format,
           "tool_call_format", config.tool_call_format,
           f"{', '.join(TOOL_CALL_FORMATS)}, or a module:function parser")
  _require(config.preemption_grace_seconds > 0, "preemption_grace_seconds",
           config.preemption_grace_seconds, "a number of seconds > 0")
  if not config.model_path:  # the fresh model's shape (a checkpoint's is checked on load)
    heads, kv_heads = config.model.num_heads, config.model.num_kv_heads
    _require(kv_heads >= 1 and heads % kv_heads == 0, "model.num_kv_heads", kv_heads,
             f"a divisor of model.num_heads={heads}")
    _require(config.model.hidden_size % heads == 0, "model.num_heads", heads,
             f"a divisor of model.hidden_size={config.model.hidden_size}")
  _require(config.lr_scheduler_type in LR_SCHEDULES, "lr_scheduler_type",
           config.lr_scheduler_type, ", ".join(LR_SCHEDULES))
  _require(config.distributed in ("auto", "yes", "no"), "distributed", config.distributed,
           "auto, yes, no")
  _require(config.parallelism in PARALLELISM, "parallelism", config.parallelism,
           ", ".join(PARALLELISM))
  _require(config.chat_template in ("auto", "none"), "chat_template", config.chat_template,
           "auto, none")
  _require(config.dtype in ("float32", "bfloat16"), "dtype", config.dtype, "float32, bfloat16")
  _require(config.attention in attention.CHOICES, "attention", config.attention,
           ", ".join(attention.CHOICES))
  _require(config.param_dtype in ("float32", "bfloat16"), "param_dtype", config.param_dtype,
           "float32, bfloat16")
  _require(bool(reward_func_specs(config)), "reward_funcs", config.reward_funcs,
           "one or more built-in names or module:function paths")
  _require(config.export_format in EXPORT_FORMATS, "export_format", config.export_format,
           ", ".join(EXPORT_FORMATS))
  if lora.from_config(config.lora) is not None:  # the lora.* fields are checked there
    _require(not config.sync_ref_model, "sync_ref_model", config.sync_ref_model,
             "False with LoRA (lora.rank > 0): the reference is the frozen base itself")
  grpo_config(config, eos_token_ids=(0,), pad_token_id=0)  # loss / sampling field checks
