"""The builders of a run, from its config: data, rewards, model, tokenizer, the compiled
step for its layout, the optimizer, the warm-up, the checkpoint to resume. Nothing here
parses flags; it writes only the warm-up cache (and reads checkpoints). `train` (the
command) and `plan` (the TPU planner) both build through here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx

from grpo_jax import checkpoint, grpo, warmup
from grpo_jax import config as config_lib
from grpo_jax.data import chat, demo, loading, validate
from grpo_jax.errors import UserError
from grpo_jax.layouts import mesh as mesh_lib
from grpo_jax.layouts import planned, pmap
from grpo_jax.models import ModelConfig, Transformer, attention, hf, lora, presets
from grpo_jax.rewards import resolve_reward_funcs
from grpo_jax.tools import builtin as tools_builtin
from grpo_jax.tools import calls as tool_calls
from grpo_jax.tools import host as tools_host

log = logging.getLogger("grpo_jax")


@dataclasses.dataclass
class Setup:
  """Everything built from the config and checked before the workdir is touched."""

  tokenizer: Any
  eos_token_ids: tuple[int, ...]
  model_config: ModelConfig
  model_def: nnx.GraphDef
  init_params: nnx.State
  train_data: Any
  eval_data: Any
  reward_funcs: list
  grpo_config: grpo.GRPOConfig
  # LoRA (lora.rank > 0): `model_def` / `model_config` are the adapted model's, and
  # `init_params` the base, read by `reference_def` (the plain model's graphdef) as the
  # reference; `adapters_like` the adapters' shapes. Both None without LoRA.
  reference_def: nnx.GraphDef | None = None
  adapters_like: nnx.State | None = None
  tools: tools_host.ToolSetup | None = None  # config.tools / environment_factory, if any
  # the data's identity (`data.validate.fingerprint`), saved with every checkpoint
  data_fingerprint: dict = dataclasses.field(default_factory=dict)

  @property
  def uses_lora(self) -> bool:
    """Whether the run trains LoRA adapters on a frozen base (`reference_def` set)."""
    return self.reference_def is not None

  @property
  def base_def(self) -> nnx.GraphDef:
    """The graphdef that reads `init_params` (the plain model's, also with LoRA)."""
    return self.reference_def if self.uses_lora else self.model_def

  @property
  def trainable_like(self):
    """Shapes of what the optimizer trains: the adapters with LoRA, else the whole model."""
    return self.init_params if self.adapters_like is None else self.adapters_like


def runtime_settings(config, platform: str) -> dict[str, Any]:
  """The model's compute settings for `platform`: dtype, layer scan, attention kernel."""
  try:
    kernel = attention.resolve(config.attention, platform, config.dtype)
  except ValueError as e:
    raise UserError(f"config.{e}") from None
  return dict(dtype=config.dtype, scan_layers=config.scan_layers, attention=kernel)


def model_config(config, platform: str | None = None) -> ModelConfig:
  """The run's architecture, read without any weights: a checkpoint's config.json, a
  preset's (`preset:<name>`), or the demo model's; compute settings for `platform`
  (default: this process's devices')."""
  runtime = runtime_settings(config, platform or jax.devices()[0].platform)
  if presets.is_preset(config.model_path):
    return hf.config_from_hf(presets.hf_config(config.model_path)).replace(**runtime)
  if config.model_path:
    return hf.config_from_hf(hf.read_config(config.model_path)).replace(**runtime)
  return ModelConfig(vocab_size=len(demo.build_demo_tokenizer(tools_host.uses_tools(config))),
                     **runtime, **config.model.to_dict())


def build_model(config):
  """(tokenizer, eos ids, model config, graphdef, params): a HF checkpoint, or the demo's."""
  if presets.is_preset(config.model_path):
    raise UserError(f"config.model_path={config.model_path!r} is a preset: shapes without "
                    "weights, for `python -m grpo_jax.plan`; train needs a checkpoint directory")
  param_dtype = jnp.dtype(config.param_dtype)
  if config.model_path:
    model, tokenizer = hf.from_pretrained(
        config.model_path, param_dtype=param_dtype,
        **runtime_settings(config, jax.devices()[0].platform))
    if tokenizer is None:
      raise UserError(f"config.model_path={config.model_path!r} holds no tokenizer files")
    eos_ids = hf.eos_token_ids(config.model_path, tokenizer)
  else:
    tokenizer = demo.build_demo_tokenizer(tools_host.uses_tools(config))
    model = Transformer(model_config(config), nnx.Rngs(config.seed))
    eos_ids = (tokenizer.eos_token_id,)
  graphdef, params = nnx.split(model)
  if param_dtype != jnp.float32:  # a checkpoint is read in param_dtype already
    params = jax.tree.map(lambda x: x if x.dtype == param_dtype else x.astype(param_dtype),
                          params)
  return tokenizer, eos_ids, model.cfg, graphdef, params


def check_datasets(config, tokenizer, tools, train_data, eval_data):
  """Every prompt of both splits checked now, not when a step draws it (`data.validate`):
  the run refuses bad rows in one line, or drops them with `skip_bad_rows`."""
  schemas = tools.schemas if tools else None

  def token_counts(prompts: list) -> list[int]:
    texts, special = chat.render_prompts(tokenizer, prompts, system_prompt=config.system_prompt,
                                         mode=config.chat_template, tools=schemas)
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]

  check = lambda data, name: validate.check_prompts(
      data, name, config.prompt_column, token_counts, config.max_prompt_length,
      config.truncate_prompts, config.skip_bad_rows)
  return check(train_data, "train"), check(eval_data, "evaluation")


def setup(config) -> Setup:
  """Checks data, reward functions and model against `config` (already validated:
  `config.validate`, which the commands run first); writes nothing."""
  pmap.check_batch(config.prompts_per_step, config.num_generations, batch_divisor(config))
  if config.micro_batch_size:  # it must divide each device's completions: say so now
    grpo.micro_batch_rows(
        config.prompts_per_step * config.num_generations // batch_divisor(config),
        config.micro_batch_size)
  train_data, eval_data = loading.load_prompt_dataset(
      config.dataset, config.prompt_column, eval_split=config.eval_split or None,
      eval_size=config.eval_size, seed=config.seed)
  reward_funcs = resolve_reward_funcs(config_lib.reward_func_specs(config), builtin_options={
      "max_completion_length": config.max_completion_length,
      "soft_punish_cache": config.soft_punish_cache})
  tokenizer, eos_ids, model_config, model_def, params = build_model(config)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
  if config.top_k > model_config.vocab_size:
    raise UserError(f"config.top_k={config.top_k} is over the model's vocabulary of "
                    f"{model_config.vocab_size} tokens; allowed: 0 (off) to "
                    f"{model_config.vocab_size}")
  tools = tools_host.tool_setup(config, tokenizer)
  train_data, eval_data = check_datasets(config, tokenizer, tools, train_data, eval_data)
  grpo_config = config_lib.grpo_config(config, eos_ids, pad_id,
                                       stop_token_ids=tools.stop_token_ids if tools else ())
  s = Setup(tokenizer, eos_ids, model_config, model_def, params, train_data, eval_data,
            reward_funcs, grpo_config, tools=tools,
            data_fingerprint=validate.fingerprint(config.dataset, config.prompt_column,
                                                  train_data, eval_data))
  adapters = lora.from_config(config.lora)
  if adapters is not None:  # the plain model becomes the reference; the actor adapts it
    s.reference_def = model_def
    s.model_def, s.adapters_like = lora.adapted_model(model_config, adapters)
    s.model_config = model_config.replace(lora=adapters)
  return s


def maybe_initialize_distributed(mode: str) -> None:
  """`jax.distributed.initialize()` on multi-host slices, before anything touches devices.

  "auto": when the environment describes several hosts (a TPU pod slice's worker list, or
  an explicit coordinator address); "yes": always (JAX then detects the cluster); "no": never.
  """
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  multi_host = "," in hosts or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
  if mode == "yes" or (mode == "auto" and multi_host):
    jax.distributed.initialize()
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())


def make_mesh(config, devices=None):
  """The configured (data, fsdp, tensor) mesh over `devices` (default: every device)."""
  return mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)


def batch_divisor(config, devices=None) -> int:
  """How many ways each global batch is split: devices (pmap) or data x fsdp (mesh)."""
  if config.parallelism == "mesh":
    layout = make_mesh(config, devices)
    return layout.shape["data"] * layout.shape["fsdp"]
  return len(devices) if devices else jax.device_count()


def build_layout(config, step: grpo.GRPOStep, devices=None):
  """The pure step compiled for the configured layout: pmap (default) or a sharded mesh.
  `devices`: those to compile for (default: this run's; `grpo_jax.plan` passes a TPU
  topology's)."""
  if config.parallelism == "mesh":
    return mesh_lib.mesh_step(step, make_mesh(config, devices))
  if devices:
    return pmap.pmap_step(step, devices)
  # Multi-host: pmap spans the devices of every host; each host feeds its local ones.
  return pmap.pmap_step(step, jax.local_devices() if jax.process_count() == 1 else None)


def planned_layout(config, step: grpo.GRPOStep, model_cfg: ModelConfig):
  """`build_layout`'s layout, whose sampler, score pass and update run the settings the
  memory plan chooses for each shape (`planned.PlannedStep`)."""
  devices = jax.devices() if config.parallelism == "mesh" else jax.local_devices()
  return planned.PlannedStep(build_layout(config, step), model_cfg, devices,
                            config.memory_limit_gib, config.micro_batch_size, config.remat)


def make_optimizer(config):
  """(optax transformation, learning-rate schedule) of the configured AdamW.

  The schedule counts optimizer updates, which is what optax's step counter counts:
  max_steps x num_iterations of them (each step updates num_iterations times), so a linear
  schedule reaches 0 after the last update, not after max_steps of them."""
  updates = config.max_steps * config.num_iterations
  return grpo.make_optimizer(
      config.learning_rate, updates, warmup_steps=int(config.warmup_ratio * updates),
      schedule=config.lr_scheduler_type, max_grad_norm=config.max_grad_norm,
      weight_decay=config.weight_decay, b1=config.adam_beta1, b2=config.adam_beta2)


def architecture(s: Setup) -> dict[str, Any]:
  """The model's shape (runtime settings and the adapters, which the config holds, aside)."""
  arch = dataclasses.asdict(s.model_config)
  for runtime_only in ("dtype", "scan_layers", "attention", "lora"):
    arch.pop(runtime_only)
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in arch.items()}


def fingerprint(s: Setup) -> dict[str, Any]:
  """What a checkpoint must match to be restored into this run: the architecture and, with
  LoRA, the digest of the base weights (adapters are only meaningful on their base)."""
  if not s.uses_lora:
    return architecture(s)
  return {**architecture(s), "lora_base_weights": lora.weights_digest(s.init_params)}


def uses_warmup(config) -> bool:
  """The supervised warm-up exists for the demo task only (its demonstrations); with other
  data `sft_steps` is ignored, so a custom dataset needs no `--config.sft_steps=0`."""
  return config.sft_steps > 0 and config.dataset == config_lib.DEMO_DATASET


def warmup_key(config, s: Setup) -> dict[str, Any]:
  """What produced a cached warm-up: a cache made under other values is rebuilt."""
  fields = ("sft_steps", "sft_batch_size", "sft_learning_rate", "sft_reasoning_prob",
            "dataset", "prompt_column", "max_prompt_length", "max_completion_length", "seed",
            "param_dtype", "tools")
  return {**{f: config[f] for f in fields}, "model": architecture(s)}


def run_warmup(config, s: Setup, workdir: epath.Path, writer) -> nnx.State:
  """The demo's supervised warm-up on imperfect demonstrations (cached in the workdir)."""
  prompts = list(s.train_data[config.prompt_column])
  answers = list(s.train_data["answer"])

  # The tools demo (a tool or environment method named calculator): demonstrations that
  # call the calculator, or guess.
  tool_names = {schema["function"]["name"] for schema in s.tools.schemas} if s.tools else set()
  calls_calculator = "calculator" in tool_names
  if calls_calculator:
    render = tools_host.ResponseRenderer(s.tokenizer, s.tools.schemas)
    respond = lambda expression: render.text([tool_calls.ToolResult(
        "calculator", tools_builtin.calculator(expression), False)], after_eos=False)

  def make_demo(i, rng):
    if calls_calculator:
      return demo.tool_demonstration(prompts[i], rng, config.sft_reasoning_prob, respond)
    return demo.demonstration(prompts[i], answers[i], rng, config.sft_reasoning_prob)

  def run():
    log.info("Supervised warm-up: %d steps on imperfect demonstrations%s", config.sft_steps,
             " (calculator calls)" if calls_calculator else "")
    params, loss = warmup.supervised_warmup(
        s.base_def, s.init_params, s.tokenizer, prompts, make_demo, steps=config.sft_steps,
        batch_size=config.sft_batch_size, learning_rate=config.sft_learning_rate,
        max_prompt_length=config.max_prompt_length,
        max_completion_length=config.max_completion_length, seed=config.seed)
    return params, {"loss": loss, "steps": config.sft_steps}

  params, stats = warmup.cached_warmup(workdir / "warmup", s.init_params, run,
                                       key=warmup_key(config, s))
  if writer is not None:
    writer.write_scalars(0, {"warmup/loss": stats["loss"], "warmup/seconds": stats["seconds"]})
  log.info("Warm-up: loss %.4f, %.1f s%s", stats["loss"], stats["seconds"],
           " (cached)" if stats["cached"] else "")
  return params


def restore_checkpoint(config, s: Setup, ckpt: checkpoint.Checkpointer):
  """The newest intact checkpoint (`checkpoint.Restored`, host arrays) or None; refuses
  one whose config differs in a field that changes the trajectory."""
  like_state = grpo.TrainState(jnp.zeros((), jnp.int32), s.trainable_like,
                               jax.eval_shape(make_optimizer(config)[0].init, s.trainable_like))
  # With LoRA (the base is the reference) or no reference pass, no reference is checkpointed.
  keeps = not s.uses_lora and config_lib.keeps_reference(config)
  restored = ckpt.restore_latest(like_state, s.init_params if keeps else None)
  if restored is None:
    return None
  saved = restored.meta.get("config")
  if saved is None:
    log.warning("The checkpoint of step %d holds no config (an older grpo_jax wrote it): "
                "not compared with this run's", restored.step)
    return restored
  changes = config_lib.trajectory_changes(saved, config_lib.as_json(config))
  data_change = validate.data_changes(restored.meta.get("dataset"), s.data_fingerprint)
  changes += [data_change] if data_change else []
  if changes and not config.allow_config_change:
    raise UserError(f"the config differs from the one the checkpoint of step {restored.step} "
                    f"was trained with: {'; '.join(changes)}; rerun with the checkpoint's "
                    "values, or pass --config.allow_config_change=True to continue with the "
                    "new ones")
  for change in changes:
    log.warning("Resuming with a changed config (allow_config_change): %s", change)
  return restored
