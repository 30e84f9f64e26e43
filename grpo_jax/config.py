"""The config schema: every field with its GRPO-practice default, and one validation pass.

Field names follow TRL's GRPOConfig where TRL has one. `configs/*.py` start from
`base_config()` and override what their recipe needs.
"""

from __future__ import annotations

import difflib
import json
import math
from typing import Any

import ml_collections
from ml_collections import config_dict

from grpo_jax import grpo, sampling
from grpo_jax.errors import ConfigError
from grpo_jax.models import attention, lora
from grpo_jax.tools.calls import FORMATS as TOOL_CALL_FORMATS

PARALLELISM = ("pmap", "mesh")
DEMO_DATASET = "demo:arithmetic"
LR_SCHEDULES = ("constant", "linear", "cosine")
EXPORT_FORMATS = ("merged", "peft")


def base_config() -> ml_collections.ConfigDict:
  """Defaults for real models (GRPO practice), before any recipe's overrides."""
  c = ml_collections.ConfigDict()
  # Model: a local Hugging Face directory, or "" for a fresh model built from `model`.
  c.model_path = ""
  c.model = ml_collections.ConfigDict(dict(
      hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
      rope_theta=10000.0, tie_word_embeddings=True, qkv_bias=False, qk_norm=False))
  c.dtype = "float32"  # compute dtype: float32 or bfloat16
  c.param_dtype = "float32"  # storage of actor, reference and AdamW moments: float32, bfloat16
  # The train pass recomputes each layer in its backward pass (less memory, one more
  # forward pass). None: the memory plan decides (on only where the update would not fit
  # otherwise); True / False: as set.
  c.remat = config_dict.placeholder(bool)
  c.scan_layers = False  # True: one lax.scan over layers (faster compiles of deep models)
  # Attention kernel of full-sequence passes: auto (TPU splash, GPU cuDNN in bfloat16 /
  # flash in float32, CPU materialised blocks below 512 positions and flash from there),
  # or one of xla, flash, cudnn (GPU), splash (TPU).
  c.attention = "auto"
  c.export_hf = ""  # directory (relative to the workdir) for the final actor as a HF checkpoint
  # With LoRA: merged (base + adapters as one HF checkpoint) or peft (a PEFT adapter folder,
  # adapter_model.safetensors + adapter_config.json, that peft loads onto the base model).
  c.export_format = "merged"
  # LoRA (PEFT's LoraConfig names): rank 0 is off (full fine-tuning). With rank r > 0 every
  # targeted projection gets adapters A [in, r] (uniform +-1/sqrt(in)) and B [r, out] (zeros),
  # y = x W + (alpha / r) dropout(x) A B: step 0 is the base model exactly. Only the adapters
  # are trained (AdamW state for them alone, float32); the base is frozen and doubles as the
  # reference (adapters off), so no reference copy is made or checkpointed.
  c.lora = ml_collections.ConfigDict(dict(
      rank=0,
      alpha=8.0,  # PEFT's default lora_alpha; the update scale is alpha / rank
      dropout=0.0,  # on the adapters' input, in the train pass only (not in sampling)
      target_modules="all-linear",  # or a comma-separated list of q_proj,k_proj,...,down_proj
      base_dtype="float32",  # storage of the frozen base: float32 or bfloat16
      # none, int8 (per-column absmax) or nf4 (QLoRA's NormalFloat4, blocks of 64 rows):
      # the base's projections quantised with qwix, dequantised at each matmul.
      base_quantization="none",
  ))

  # Data.
  c.dataset = DEMO_DATASET
  c.prompt_column = "prompt"
  c.eval_split = ""  # a named split of the dataset to evaluate on ("" = hold out eval_size rows)
  c.eval_size = 0  # rows held out of a local file for evaluation (0 = no evaluation)
  # Greedy held-out prompts decoded per evaluation batch (0: all at once; the memory plan
  # then decodes them in as many chunks as the device's memory needs).
  c.eval_batch_size = 0
  c.max_prompt_length = 512
  c.truncate_prompts = False  # True: keep the last max_prompt_length tokens, with a warning
  # Bad prompt rows (missing, not text, empty, not valid Unicode, too long) are found when
  # the data is loaded; False: the run refuses to start, naming them; True: they are skipped.
  c.skip_bad_rows = False
  c.chat_template = "auto"  # auto: render prompts with the tokenizer's chat template if any
  c.system_prompt = ""  # prepended as a system message when the chat template is used

  # Rewards.
  c.reward_funcs = "correctness_reward,format_reward"
  c.reward_weights = config_dict.placeholder(tuple)  # None: every function weighs 1
  # A reward function call that runs longer than this stops the run with one line naming
  # it (0: no limit); the last checkpoint stays as it was.
  c.reward_timeout_seconds = 300.0
  c.accuracy_reward = "correctness_reward"  # eval/accuracy is this function's mean

  # Sampling.
  c.num_generations = 8
  c.prompts_per_step = 8  # global, across all devices and hosts
  c.max_completion_length = 256
  c.temperature = 1.0
  c.top_p = 1.0
  c.top_k = 0

  # Tools (TRL's names): multi-turn rollouts in which the model calls Python functions. A
  # row stops at EOS or at the end of a tool call; its calls run on the host (each with
  # tool_timeout_seconds); their responses, rendered by the chat template, are prefilled
  # into the row's KV cache and it decodes on, up to max_tool_calling_iterations responses,
  # all within max_completion_length tokens. Response tokens are context and reward text,
  # but out of the loss, the KL, the entropy and every token metric (docs/tools.md).
  c.tools = ""  # comma-separated: built-in names (calculator) or module:function paths
  # module:Class: one instance per completion, reset(**row) first, its public methods the
  # completion's tools; reward functions get the instances as environments=.
  c.environment_factory = ""
  c.max_tool_calling_iterations = 5
  # How calls are written: auto (from the chat template), hermes (Qwen2.5 / Qwen3 /
  # SmolLM2: <tool_call>{json}</tool_call>), llama3 (a JSON turn), or module:function.
  c.tool_call_format = "auto"
  c.tool_timeout_seconds = 10.0

  # Optimisation and loss.
  c.learning_rate = 5e-7
  c.lr_scheduler_type = "linear"
  c.warmup_ratio = 0.0
  c.max_grad_norm = 1.0
  c.weight_decay = 0.0
  c.adam_beta1 = 0.9
  c.adam_beta2 = 0.999
  c.beta = 0.04
  c.epsilon = 0.2
  c.epsilon_high = config_dict.placeholder(float)  # None: same as epsilon
  c.loss_type = "grpo"  # grpo, bnpo, dr_grpo, dapo, cispo, sapo (docs/loss.md)
  c.scale_rewards = "group"
  c.num_iterations = 1
  # The GRPO variants, with TRL 1.x's names, defaults and formulas (docs/loss.md).
  # KL per token times the importance ratio (DeepSeek-V3.2's unbiased KL estimate). TRL's
  # default is True; ours is False, the classic k3 term, with the default beta = 0.04.
  c.use_bias_correction_kl = False
  # token: a ratio per token (PPO, GRPO); sequence: GSPO, one ratio per completion, the exp
  # of the mean of its tokens' log-ratios; sequence_token: GSPO-token (the sequence ratio's
  # value, each token's own gradient; the GSPO paper, not in TRL).
  c.importance_sampling_level = "token"
  # Two-sided clipping (INTELLECT-2): the unclipped ratio is capped at delta (> 1 +
  # epsilon_high); None: off.
  c.delta = config_dict.placeholder(float)
  c.sapo_temperature_pos = 1.0  # loss_type sapo: the gate's temperature where A > 0
  c.sapo_temperature_neg = 1.05  # ... and where A <= 0
  # rho of "Beyond the 80/20 rule": only tokens whose entropy is at or above the (1 - rho)
  # quantile of the global batch's completion tokens enter the policy loss (the KL term
  # keeps every token); 1.0: all tokens. The paper recommends 0.2.
  c.top_entropy_quantile = 1.0
  # DAPO: completions that did not end with EOS are left out of the loss (their rewards
  # still count in the group statistics).
  c.mask_truncated_completions = False
  # sum_then_normalize: weighted sum of the reward functions, then the group statistics;
  # normalize_then_sum: GDPO, each function z-scored within its group, weighted sum, then
  # z-scored over the global batch (scale_rewards does not apply).
  c.multi_objective_aggregation = "sum_then_normalize"
  # TR-DPO: every ref_model_sync_steps optimizer updates the reference becomes
  # ref_model_mixup_alpha * actor + (1 - ref_model_mixup_alpha) * reference.
  c.sync_ref_model = False
  c.ref_model_mixup_alpha = 0.6
  c.ref_model_sync_steps = 512
  # DAPO dynamic sampling (verl's names): groups whose rewards are all equal are dropped and
  # more prompts sampled, up to max_num_gen_batches sampling rounds per step, until
  # prompts_per_step informative groups are gathered; the missing ones are filler that adds
  # nothing to the loss. A step with no informative group at all skips its update (counted
  # toward max_nonfinite_steps). Metrics dynamic_sampling/rounds, dynamic_sampling/kept_groups.
  c.dynamic_sampling = False
  c.max_num_gen_batches = 4
  # The built-in reward soft_overlong_punishment (DAPO): 0 up to max_completion_length -
  # soft_punish_cache tokens, then falling linearly to -1 at max_completion_length
  # (0: a fifth of max_completion_length, DAPO's 4k of 20k).
  c.soft_punish_cache = 0
  c.logprob_chunk_size = 0  # vocabulary entries per log-prob chunk; 0: ~16 MiB of logits
  # Completions per train forward/backward on a device (gradients accumulated over the
  # micro-batches); 0: the memory plan chooses (the largest that fits, ~1k tokens on CPU).
  c.micro_batch_size = 0
  # Memory per device the plan may fill, in GiB; 0: the device's own (`bytes_limit` on a
  # GPU / TPU; on a CPU the available RAM less headroom, shared by its devices).
  c.memory_limit_gib = 0.0
  # Score and update passes run on the batch's longest completion (+1) rounded up to a
  # multiple of this many tokens, so early EOS stops make them cheaper (0: always the full
  # max_completion_length). At most ceil(max_completion_length / this) compiled shapes.
  c.train_length_bucket = 64

  # Supervised warm-up on demonstrations before GRPO (the demo task's; 0 = none).
  c.sft_steps = 0
  c.sft_batch_size = 64
  c.sft_learning_rate = 1e-3
  c.sft_reasoning_prob = 0.4

  # Loop.
  c.max_steps = 200
  # A time budget for this invocation's training, in minutes (0: none): the step that runs
  # past it is the last one (final evaluation, checkpoint, export, as at max_steps). A
  # resumed run gets a new budget.
  c.max_train_minutes = 0.0
  c.seed = 0
  c.log_every = 1
  c.eval_every = 50
  c.checkpoint_every = 50
  c.keep_checkpoints = 2  # the newest and one to fall back on (a 135M run: 1.6 GB each)
  # On SIGTERM / SIGINT (a spot slice's preemption notice): finish or abandon the current
  # step, checkpoint and exit within this many seconds (then exit regardless).
  c.preemption_grace_seconds = 25.0
  # Steps in a row whose update was skipped (non-finite loss or gradient norm, or no reward
  # at all) before the run stops with an error.
  c.max_nonfinite_steps = 10
  # A resume whose config differs from the checkpoint's in a field that changes the
  # trajectory is an error; True: a warning per difference, and the new values apply.
  c.allow_config_change = False
  # A gs:// workdir's marker left by a run that is gone (local workdirs need no override:
  # their lock dies with its process).
  c.break_workdir_lock = False
  c.num_sample_texts = 4  # completions written as text summaries at each eval
  c.parallelism = "pmap"  # pmap: data parallel, replicated; mesh: sharded (jit + Mesh)
  c.distributed = "auto"  # jax.distributed.initialize(): auto (multi-host detected), yes, no
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the rest
  return c


# Fields that change how a run is logged, checkpointed, evaluated or laid out on devices,
# not the trajectory it follows (layout fields change results only at float rounding):
# a resume may change them. Every other field must match the checkpoint's.
RESUME_FREE_FIELDS = frozenset({
    "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "num_sample_texts",
    "max_train_minutes", "eval_batch_size", "break_workdir_lock",
    "accuracy_reward", "export_hf", "distributed", "parallelism", "mesh", "remat",
    "scan_layers", "attention", "micro_batch_size", "memory_limit_gib", "logprob_chunk_size", "train_length_bucket",
    "preemption_grace_seconds", "max_nonfinite_steps", "allow_config_change",
    "tool_timeout_seconds", "reward_timeout_seconds"})


def from_file(path) -> ml_collections.ConfigDict:
  """`get_config()` of a config file (configs/ is a folder of files, not a package): how a
  recipe starts from another, e.g. configs/dapo.py from configs/gsm8k.py."""
  import importlib.util  # noqa: PLC0415
  spec = importlib.util.spec_from_file_location(f"grpo_jax_config_{abs(hash(str(path)))}",
                                                str(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON data (tuples become lists), as a checkpoint stores it."""
  return json.loads(json.dumps(config.to_dict(), default=str))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def trajectory_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """'field: saved -> now' for each field outside RESUME_FREE_FIELDS that differs between
  a checkpoint's config and this run's (both as `as_json` gives them). A field one side
  lacks (written by another version) counts as its default."""
  defaults = _flatten(as_json(base_config()))
  old, new = ({**defaults, **_flatten(c)} for c in (saved, current))
  return [f"{field}: {old.get(field)!r} -> {new.get(field)!r}"
          for field in sorted(set(old) | set(new))
          if field.split(".")[0] not in RESUME_FREE_FIELDS and old.get(field) != new.get(field)]


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


def reward_func_specs(config) -> list[str]:
  specs = config.reward_funcs
  if isinstance(specs, str):
    specs = specs.split(",")
  return [s.strip() for s in specs if s.strip()]


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


def sampling_config(config, eos_token_ids, pad_token_id, stop_token_ids=()
                    ) -> sampling.SamplingConfig:
  return sampling.SamplingConfig(
      max_completion_length=config.max_completion_length, eos_token_ids=tuple(eos_token_ids),
      pad_token_id=pad_token_id, num_generations=config.num_generations,
      temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
      stop_token_ids=tuple(stop_token_ids))


def grpo_config(config, eos_token_ids, pad_token_id, stop_token_ids=()) -> grpo.GRPOConfig:
  """The step's static config as the config gives it (`micro_batch_size=0` and
  `remat=None` are then the whole batch and off: the memory plan, `grpo_jax.memory`,
  chooses them before anything is compiled); `stop_token_ids`: where multi-turn decoding
  also pauses a row (a tool call's end)."""
  weights = config.reward_weights
  if weights is not None and not all(isinstance(w, (int, float)) for w in weights):
    raise ConfigError(f"config.reward_weights={weights!r}; allowed: a tuple of numbers, "
                      "one per reward function, e.g. '(1.0, 0.5)'")
  return grpo.GRPOConfig(
      sampling=sampling_config(config, eos_token_ids, pad_token_id, stop_token_ids),
      beta=config.beta, epsilon=config.epsilon, epsilon_high=config.epsilon_high,
      loss_type=config.loss_type, scale_rewards=config.scale_rewards,
      reward_weights=None if weights is None else tuple(float(w) for w in weights),
      num_reward_funcs=len(reward_func_specs(config)), num_iterations=config.num_iterations,
      use_bias_correction_kl=config.use_bias_correction_kl,
      importance_sampling_level=config.importance_sampling_level, delta=config.delta,
      sapo_temperature_pos=config.sapo_temperature_pos,
      sapo_temperature_neg=config.sapo_temperature_neg,
      top_entropy_quantile=config.top_entropy_quantile,
      mask_truncated_completions=config.mask_truncated_completions,
      multi_objective_aggregation=config.multi_objective_aggregation,
      logprob_chunk_size=config.logprob_chunk_size, micro_batch_size=config.micro_batch_size,
      remat=bool(config.remat), dropout_seed=config.seed if lora_dropout(config) else None)


def keeps_reference(config) -> bool:
  """Whether a run holds a frozen reference beside the actor: for its log-probs (beta > 0)
  or to sync it toward the actor (sync_ref_model). Otherwise none is placed, saved or
  restored. (LoRA's reference is its frozen base, which it holds in any case.)"""
  return config.beta > 0 or bool(config.sync_ref_model)


def lora_dropout(config) -> bool:
  """Whether the train pass draws LoRA dropout masks."""
  adapters = lora.from_config(config.lora)
  return adapters is not None and adapters.dropout > 0
