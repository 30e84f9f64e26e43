"""The trainer's three programs (sampler, reference pass, update), built from a config and
compiled for given devices with no weights read or allocated.

The step is the trainer's own: the same model definition, optimizer, GRPO config and
layout (`build.build_layout`), with every argument an abstract `ShapeDtypeStruct` laid
out as the trainer lays out the real one. Per chip, each phase's HBM is the resident
training state (actor, reference, AdamW moments, which stay in HBM through every phase)
plus what the phase's program adds: its other arguments, its outputs that do not reuse a
donated buffer, and XLA's temporaries.

With LoRA (`lora.rank > 0`) the trainable params are the adapters (AdamW over them alone)
and the reference is the frozen base as the loop places it (`lora.prepare_base`, then
`grpo.as_reference`): one copy, read by the sampler (with the adapters), the reference pass
and the update. Resident bytes count 4-bit values at half a byte (`quantize.stored_bytes`'s
rule, per shard: XLA on TPU packs them); `Plan.lora["xla_base_bytes"]` is the same base as
the TPU compiler sizes it, from the sampler's argument bytes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from grpo_jax import build as build_lib
from grpo_jax import config as config_lib
from grpo_jax import grpo, memory
from grpo_jax.layouts import mesh as mesh_lib
from grpo_jax.layouts import planned, pmap
from grpo_jax.models import ModelConfig, lora as lora_lib, quantize
from grpo_jax.plan import abstract, hlo, roofline

DUMP_DIR = os.environ.get("GRPO_JAX_PLAN_DUMP", "")  # a folder: write each program's HLO there


@dataclasses.dataclass
class Phase:
  name: str
  compile_seconds: float
  argument_bytes: int  # what XLA reports, per chip
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  batch_bytes: int  # per chip: the arguments that are not resident state (prompts, rollout)
  collectives: dict[str, dict[str, float]]  # per kind: count, buffer and moved bytes
  found: list[hlo.Collective]
  flops_per_chip: float
  hbm_bytes_per_chip: float
  out_of_memory: str = ""  # XLA refused to compile it: what it said

  def total(self, resident: int) -> int:
    """Peak HBM per chip while this phase runs (`memory.peak_bytes`: the resident state, in
    HBM whether this program reads it or not, its batch arguments, outputs that reuse no
    donated buffer, temporaries and code)."""
    return memory.peak_bytes(self, resident, self.batch_bytes)

  # memory_analysis()'s names, which memory.peak_bytes reads
  output_size_in_bytes = property(lambda self: self.output_bytes)
  alias_size_in_bytes = property(lambda self: self.alias_bytes)
  temp_size_in_bytes = property(lambda self: self.temp_bytes)
  generated_code_size_in_bytes = property(lambda self: self.code_bytes)

  @property
  def ici_bytes(self) -> float:
    return sum(v["moved_bytes"] for v in self.collectives.values())


@dataclasses.dataclass
class Plan:
  model: ModelConfig
  layout: str  # e.g. "mesh data=1 fsdp=8 tensor=1" or "pmap x8"
  params: int  # bytes per chip of the trainable params: the actor, or the LoRA adapters
  optimizer: int
  reference: int  # with LoRA the frozen base (it is the reference: one copy)
  kv_cache: int  # per chip, inside the sampler's temporaries
  phases: dict[str, Phase]
  # LoRA: rank, alpha, targets, base_dtype, quantization, adapter / base parameter counts,
  # xla_base_bytes (see the module doc); None for full fine-tuning.
  lora: dict | None = None
  # The memory plan's choice per phase (memory.Chunks / Score / Update; None: nothing
  # fits, the phase shown is the smallest setting tried), and its words.
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)
  described: dict[str, str] = dataclasses.field(default_factory=dict)
  limit: int = 0  # bytes per chip the plan filled against
  # per phase, every setting the plan looked at: (words, bytes; None: the estimate ruled it
  # out uncompiled; inf: the compiler refused it)
  tried: dict[str, list[tuple[str, float | None]]] = dataclasses.field(default_factory=dict)
  rows_per_shard: int = 0  # completions each chip (pmap) or data x fsdp shard trains on
  # bytes of weights one chip reads per decoded token (the decode copy, and on a mesh the
  # gathered LM head): with `kv_cache`, the sampler's roofline (`roofline.decode_roofline`)
  decode_weights: int = 0

  @property
  def remat(self) -> bool:
    update = self.settings.get("update")
    return bool(update and update.remat)

  @property
  def resident(self) -> int:
    return self.params + self.optimizer + self.reference


def build(config, devices, model_cfg: ModelConfig | None = None):
  """(layout, model config, abstract trainable params, grpo config, abstract reference)
  for `config` on `devices`. With LoRA the model config and the step's model are the
  adapted model's, the trainable params the adapters, and the reference the frozen base
  (`abstract_reference`), as `build.setup` and the loop build them."""
  pmap.check_batch(config.prompts_per_step, config.num_generations,
                       build_lib.batch_divisor(config, devices))
  cfg = model_cfg or build_lib.model_config(config, devices[0].platform)
  graphdef, params = abstract.abstract_model(cfg, config.param_dtype)
  reference = abstract.abstract_reference(config, cfg, params)
  reference_def = None
  adapters = lora_lib.from_config(config.lora)
  if adapters is not None:  # the plain model reads the base; the actor adapts it
    reference_def = graphdef
    graphdef, params = lora_lib.adapted_model(cfg, adapters)
    cfg = cfg.replace(lora=adapters)
  grpo_cfg = config_lib.grpo_config(config, eos_token_ids=(0,), pad_token_id=0)
  tx, schedule = build_lib.make_optimizer(config)
  layout = build_lib.build_layout(
      config, grpo.GRPOStep(graphdef, tx, schedule, grpo_cfg, reference_def=reference_def),
      list(devices))
  return layout, cfg, params, grpo_cfg, reference


# The TPU compiler's two ways of saying a program does not fit (libtpu 0.0.4x).
_USED = re.compile(r"Used ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? hbm")
_TEMPORARIES = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])?\)")


def _out_of_memory(name, error: Exception, seconds: float, flops: float, hbm: float,
                   batch_bytes: int, resident_passed: int) -> Phase:
  """A phase the TPU compiler refused for want of HBM, sized by what it says it used."""
  message = " ".join(str(error).split())
  scale = lambda unit: {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(unit, 1)
  size = lambda m: int(float(m.group(1)) * scale(m.group(2)))
  temps = _TEMPORARIES.search(message)
  used = _USED.search(message)
  if temps:  # temporaries alone
    temp_bytes, summary = size(temps), temps.group(0)
  elif used:  # the whole program: its arguments (resident ones among them) too
    temp_bytes, summary = max(size(used) - resident_passed - batch_bytes, 0), used.group(0)
  else:
    temp_bytes, summary = 0, message[:200]
  return Phase(name, seconds, resident_passed + batch_bytes, 0, 0, temp_bytes, 0, batch_bytes,
               {}, [], flops, hbm, out_of_memory=summary)


def _compile(name, fn, args, unknown_trips: int, flops: float, hbm: float,
             batch_bytes: int, resident_passed: int) -> Phase:
  started = time.perf_counter()
  try:
    compiled = fn.lower(*args).compile()
  except Exception as e:  # XlaRuntimeError has no stable import path across jax versions
    if memory.is_out_of_memory(e):
      return _out_of_memory(name, e, time.perf_counter() - started, flops, hbm,
                            batch_bytes, resident_passed)
    raise
  if DUMP_DIR:
    with open(f"{DUMP_DIR}/{name}.hlo.txt", "w") as f:
      f.write(compiled.as_text())
  seconds = time.perf_counter() - started
  mem = compiled.memory_analysis()
  found = hlo.collectives(compiled.as_text(), unknown_trips)
  return Phase(name, seconds, mem.argument_size_in_bytes, mem.output_size_in_bytes,
               mem.alias_size_in_bytes, mem.temp_size_in_bytes,
               mem.generated_code_size_in_bytes, batch_bytes, hlo.summarize(found),
               found, flops, hbm)


@dataclasses.dataclass
class Resident:
  """The training state as the trainer lays it out on `devices`, abstract: the trainable
  params (the actor, or the LoRA adapters), their AdamW state and the reference (with
  LoRA the frozen base), each sharded on a mesh or with a leading device axis (pmap)."""

  layout: object
  cfg: ModelConfig
  grpo_cfg: grpo.GRPOConfig
  name: str  # e.g. "mesh data=1 fsdp=8 tensor=1" or "pmap x8"
  mesh_axes: dict[str, int] | None  # the mesh's axis sizes; None under pmap
  params: object  # abstract, unplaced (for eval_shape)
  reference: object
  state: grpo.TrainState
  params_s: object  # placed: sharded, or with a device axis
  reference_s: object
  state_s: grpo.TrainState

  @property
  def per_device_axis(self) -> bool:
    return self.mesh_axes is None

  @property
  def uses_lora(self) -> bool:
    return self.layout.step.uses_lora

  def bytes(self, tree) -> int:
    """Per chip (4-bit values at half a byte)."""
    return abstract.shard_bytes(tree, self.per_device_axis)

  def batch(self, tree):
    """A batch tree laid out as the trainer feeds it: rows over the mesh's (data, fsdp)
    shards, or [devices, rows / devices, ...] under pmap."""
    if self.mesh_axes is None:
      return abstract.per_device(tree, len(self.layout.devices))
    return abstract.with_shardings(tree, jax.tree.map(lambda _: self.layout.batch_sharding, tree))

  def place(self, tree):
    """Parameters laid out like the trainer's (`place_params`)."""
    if self.mesh_axes is None:
      return abstract.replicated(tree, len(self.layout.devices))
    return abstract.with_shardings(tree, mesh_lib.param_shardings(tree, self.layout.mesh))


def resident_state(config, devices, model_cfg: ModelConfig | None = None) -> Resident:
  """`config`'s training state on `devices`, abstract and laid out, nothing compiled."""
  layout, cfg, params, grpo_cfg, reference = build(config, devices, model_cfg)
  tx = layout.step.tx
  opt_state = jax.eval_shape(tx.init, params)
  state = grpo.TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt_state)
  if isinstance(layout, mesh_lib.MeshStep):
    mesh = layout.mesh
    mesh_axes = {a: mesh.shape[a] for a in mesh_lib.MESH_AXES}
    name = "mesh " + " ".join(f"{a}={s}" for a, s in mesh_axes.items())
    params_s = abstract.with_shardings(params, mesh_lib.param_shardings(params, mesh))
    reference_s = abstract.with_shardings(reference, mesh_lib.param_shardings(reference, mesh))
    opt_s = abstract.with_shardings(opt_state, layout.opt_state_shardings(params_s))
    state_s = grpo.TrainState(jax.ShapeDtypeStruct((), jnp.int32,
                                                   sharding=NamedSharding(mesh, P())),
                              params_s, opt_s)
  else:
    n = len(layout.devices)
    mesh_axes, name = None, f"pmap x{n}"
    params_s, reference_s, state_s = (abstract.replicated(t, n) for t in (params, reference, state))
  return Resident(layout, cfg, grpo_cfg, name, mesh_axes, params, reference, state, params_s,
                  reference_s, state_s)


def compile_plan(config, devices, model_cfg: ModelConfig | None = None,
                 reuse: dict[str, tuple[Any, Phase]] | None = None,
                 limit: int | None = None) -> Plan:
  """Chooses and compiles the sampler, reference pass and update of `config` for
  `devices`, each at the fastest setting of its memory ladder that fits `limit` bytes per
  chip (default: `memory_limit_gib`, else the device's own memory), as the trainer does
  (`memory.choose` over the same ladders and figures). `model_cfg`: instead of the
  config's model, e.g. a smaller copy for a quick look; `reuse`: (setting, phase) already
  chosen for a config that differs only where that phase does not depend on it."""
  if limit is None:
    limit = memory.device_memory(devices, config.memory_limit_gib)
  r = resident_state(config, devices, model_cfg)
  layout, cfg, grpo_cfg, mesh_axes, name = r.layout, r.cfg, r.grpo_cfg, r.mesh_axes, r.name
  params, reference, state = r.params, r.reference, r.state
  params_s, reference_s, state_s, opt_s = r.params_s, r.reference_s, r.state_s, r.state_s.opt_state
  per_device_axis, uses_lora = r.per_device_axis, r.uses_lora
  n = len(devices)
  prompts, group = config.prompts_per_step, config.num_generations
  prompt_len, length = config.max_prompt_length, config.max_completion_length
  rows = prompts * group
  step = dataclasses.replace(layout.step, axis_name=None)  # for shapes: no device axis
  key = jax.eval_shape(lambda: jax.random.key(0))
  prompt_ids = jax.ShapeDtypeStruct((prompts, prompt_len), jnp.int32)
  rewards = jax.ShapeDtypeStruct((rows, grpo_cfg.num_reward_funcs), jnp.float32)
  policy = jax.eval_shape(step.policy_params, params, reference)
  rollout = jax.eval_shape(step.generate, policy, prompt_ids, prompt_ids, key)
  scored = jax.eval_shape(step.score, state, reference, rollout, rewards)[0]
  # The update reads the base with LoRA (the adapters apply to it); else not at all.
  base_arg = (reference_s,) if uses_lora else ()
  key_arg = key if per_device_axis else jax.ShapeDtypeStruct(
      key.shape, key.dtype, sharding=NamedSharding(layout.mesh, P()))
  sampler_args = (r.place(policy), r.batch(prompt_ids), r.batch(prompt_ids), key_arg)
  score_args = (state_s, reference_s, r.batch(rollout), r.batch(rewards))
  update_args = (state_s, r.batch(scored)) + base_arg

  param_bytes = abstract.shard_bytes(params_s, per_device_axis)
  reference_bytes = abstract.shard_bytes(reference_s, per_device_axis)
  opt_bytes = abstract.shard_bytes(opt_s, per_device_axis)
  policy_bytes = param_bytes + reference_bytes if uses_lora else param_bytes
  kv = abstract.kv_cache_bytes(cfg, rows, prompt_len + length, mesh_axes, n)
  flops = roofline.step_flops(cfg, prompts, group, prompt_len, length, config.beta)
  # HBM traffic per chip, the dominant terms: decoding reads this chip's weights, its whole
  # KV cache (every slot is scored, the empty ones masked) and, on a mesh, the whole LM head
  # gathered for decoding at every token; a full-sequence pass reads the gathered weights once per pass (update:
  # forward, backward, and a recompute with remat) and writes and reads its temporaries
  # about once. Full fine-tuning reads its weights in the compute dtype; LoRA reads the
  # base as it is stored (quantised kernels are dequantised where they are used) and the
  # adapters.
  itemsize = jnp.dtype(cfg.compute_dtype).itemsize
  head_bytes = cfg.vocab_size * cfg.hidden_size * itemsize if mesh_axes else 0
  if uses_lora:
    sampler_weights = policy_bytes
    pass_weights = quantize.stored_bytes(reference) + quantize.stored_bytes(params)
  else:
    sampler_weights = param_bytes * itemsize / jnp.dtype(config.param_dtype).itemsize
    pass_weights = cfg.num_params() * itemsize
  sampler_hbm = length * roofline.decode_roofline(sampler_weights + head_bytes, kv)[
      "bytes_per_token"]
  batch_bytes = lambda args: abstract.shard_bytes(args, per_device_axis)
  resident = param_bytes + opt_bytes + reference_bytes
  rows_shard = rows // layout.batch_divisor
  prompts_shard = prompts // layout.batch_divisor
  seq_len = prompt_len + length
  trainable = param_bytes
  variant = planned.with_step_config

  def sampler_fn(setting):
    cfg_s = dataclasses.replace(grpo_cfg.sampling, row_chunks=setting.chunks)
    return _compile("sampler", variant(layout, sampling=cfg_s).generate, sampler_args,
                    length - 1, flops["sampling"] / n, sampler_hbm,
                    batch_bytes(sampler_args[1:3]), policy_bytes)

  def reference_fn(setting):
    return _compile("reference", variant(layout, score_micro_batch_size=setting.rows).score,
                    score_args, 1, flops["reference"] / n, 0.0, batch_bytes(score_args[2:]),
                    resident)

  def update_fn(setting):
    # remat recomputes the forward pass in the backward one: 4 forward passes, not 3
    return _compile("update", variant(layout, micro_batch_size=setting.rows,
                                      remat=setting.remat).update,
                    update_args, 1, flops["train"] * (4 / 3 if setting.remat else 1) / n,
                    0.0, batch_bytes(update_args[1:2]),
                    param_bytes + opt_bytes + (reference_bytes if uses_lora else 0))

  sampler_batch = batch_bytes(sampler_args[1:3])
  score_batch = batch_bytes(score_args[2:])
  update_batch = batch_bytes(update_args[1:2])
  ladders = {
      "sampler": (memory.chunk_ladder(prompts_shard), sampler_fn,
                  lambda st: resident + sampler_batch + memory.estimate_sampler(
                      cfg, st, prompts_shard, group, prompt_len, length)),
      "reference": (memory.score_ladder(rows_shard), reference_fn,
                    lambda st: resident + score_batch + memory.estimate_score(cfg, st,
                                                                              seq_len)),
      "update": (memory.update_ladder(rows_shard, seq_len, devices[0].platform, cfg,
                                      config.micro_batch_size, config.remat), update_fn,
                 lambda st: resident + update_batch + memory.estimate_update(
                     cfg, st, rows_shard, seq_len, trainable)),
  }
  reuse = reuse or {}
  phases, settings, tried = {}, {}, {}
  total_rows = {"sampler": prompts_shard * group, "reference": rows_shard, "update": rows_shard}
  for phase_name, (ladder, compile_fn, estimate) in ladders.items():
    if phase_name in reuse:
      settings[phase_name], phases[phase_name] = reuse[phase_name]
      continue
    compiled: dict[Any, Phase] = {}

    def measure(setting, compile_fn=compile_fn, compiled=compiled):
      phase = compiled[setting] = compile_fn(setting)
      return (math.inf if phase.out_of_memory else phase.total(resident)), phase

    choice = memory.choose(ladder, measure, limit, estimate)
    settings[phase_name] = choice.setting
    tried[phase_name] = [(setting.describe(total_rows[phase_name]), size)
                         for setting, size in choice.tried]
    # nothing fits: show the last setting compiled (the smallest memory tried)
    phases[phase_name] = choice.program or list(compiled.values())[-1]
  described = {name: setting and setting.describe(total_rows[name])
               for name, setting in settings.items()}
  remat = bool(settings["update"] and settings["update"].remat)
  if settings["sampler"]:  # each chunk of prompts has a KV cache for its own rows
    kv //= settings["sampler"].chunks
  passes = {"reference": 1 if config.beta > 0 else 0, "update": 3 if remat else 2}
  for phase_name, count in passes.items():
    phase = phases[phase_name]
    phase.hbm_bytes_per_chip = count * pass_weights + 2 * phase.temp_bytes
  lora_info = None
  if uses_lora:
    sampler = phases["sampler"]
    lora_info = {
        "rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": list(cfg.lora.targets),
        "base_dtype": config.lora.base_dtype, "quantization": config.lora.base_quantization,
        "adapter_params": lora_lib.num_params(params),
        "base_params": lora_lib.num_params(reference),
        # the TPU compiler's size of the base (4-bit packed or not, padded to its tiles):
        # the sampler's arguments are the base, the adapters and the batch
        "xla_base_bytes": (None if sampler.out_of_memory else sampler.argument_bytes
                           - param_bytes - batch_bytes(sampler_args[1:3])),
    }
  return Plan(cfg, name, param_bytes, opt_bytes, reference_bytes, kv, phases, lora_info,
              settings=settings, described=described, limit=limit, rows_per_shard=rows_shard,
              tried=tried, decode_weights=int(sampler_weights + head_bytes))


__all__ = ["Phase", "Plan", "Resident", "build", "resident_state", "compile_plan"]
