"""The config schema: every field with its GRPO-practice default (`base_config`), and config
files read (`from_file`).

Field names follow TRL's GRPOConfig where TRL has one. `configs/*.py` start from
`base_config()` and override what their recipe needs.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

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


def from_file(path) -> ml_collections.ConfigDict:
  """`get_config()` of a config file (configs/ is a folder of files, not a package): how a
  recipe starts from another, e.g. configs/dapo.py from configs/gsm8k.py."""
  import importlib.util  # noqa: PLC0415
  spec = importlib.util.spec_from_file_location(f"grpo_jax_config_{abs(hash(str(path)))}",
                                                str(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
