"""A layout whose sampler, score pass and update run, for each shape they meet, the
program the memory plan (`memory`) chose and measured for it: `PlannedStep`, what the
trainer runs. Everything else is the wrapped layout's own."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Sequence

import jax
import numpy as np

from grpo_jax import hosts, memory, sampling
from grpo_jax.layouts import mesh
from grpo_jax.models import ModelConfig

log = logging.getLogger("grpo_jax")



def with_step_config(layout, **changes):
  """The layout `layout` (pmap or mesh) with its GRPO config changed (its own programs)."""
  step = layout.step
  return dataclasses.replace(layout, step=dataclasses.replace(
      step, cfg=dataclasses.replace(step.cfg, **changes)))


def _signature(args) -> tuple:
  leaves, tree = jax.tree.flatten(args)
  return (tree, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves))


def _compiled(fn, args, resident: int, batch: int) -> tuple[float, Any]:
  """(peak bytes, compiled program) of `fn` on `args`; inf where XLA refused for memory."""
  try:
    compiled = fn.lower(*args).compile()
  except Exception as e:  # XlaRuntimeError has no stable import path across jax versions
    if memory.is_out_of_memory(e):
      return math.inf, None
    raise
  # The measured executable runs, except where calling it directly is refused: a pmap over
  # several hosts' devices (compiled for the global shapes, called with each host's own)
  # and 4-bit arrays (QLoRA's nf4 base: the executable wants a packed layout that jit's
  # dispatch arranges). There the layout's own function runs (it compiles once more).
  four_bit = any(str(getattr(x, "dtype", "")) in ("int4", "uint4")
                 for x in jax.tree.leaves(args))
  direct = jax.process_count() == 1 and not four_bit
  return memory.peak_bytes(compiled.memory_analysis(), resident, batch), compiled if direct else fn


class PlannedStep:
  """A layout's step (`pmap.PmappedStep` / `mesh.MeshStep`) whose sampler, score pass
  and update run, for each shape they meet, the program the memory plan chose and
  measured for it (one compile when the fastest setting fits). Everything else is the
  layout's own."""

  def __init__(self, layout, model_cfg: ModelConfig, devices: Sequence[Any],
               memory_limit_gib: float = 0.0, micro_batch_size: int = 0,
               remat: bool | None = None):
    self.inner = layout
    self.model_cfg = model_cfg
    self.platform = devices[0].platform
    self.limit = memory.device_memory(devices, memory_limit_gib)
    if jax.process_count() > 1:  # every host must memory.choose (and compile) the same programs
      self.limit = int(hosts.agree(self.limit // 2**20, np.min)) * 2**20  # MiB: int32
    self.micro_batch_size, self.remat = micro_batch_size, remat
    self.programs: dict[tuple, Any] = {}
    self.choices: dict[str, tuple[Any, float]] = {}  # by program: the last (setting, bytes)
    self.resident = 0  # the placed training state's bytes per device (note_resident)
    self._score_line: dict[int, str] = {}

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def note_resident(self, state, reference) -> int:
    """The training state as placed (in memory through every program): its bytes per
    device, kept for the sampler, whose arguments hold only the policy."""
    self.resident = mesh.per_device_bytes((state.params, state.opt_state, reference))
    return self.resident

  def _run(self, key, plan, args):
    program = self.programs.get(key)
    if program is None:
      program = self.programs[key] = plan()
    return program(*args)

  # The sampler and the evaluator's.

  def sampler(self, cfg: sampling.SamplingConfig):
    name = "evaluator" if cfg.greedy else "sampler"

    def run(params, prompt_ids, prompt_mask, rng):
      args = (params, prompt_ids, prompt_mask, rng)
      return self._run((name, _signature(args)), lambda: self._plan_sampler(name, cfg, args),
                       args)
    return run

  @property
  def generate(self):
    return self.sampler(self.inner.step.cfg.sampling)

  def _plan_sampler(self, name, cfg, args):
    params, prompt_ids = args[0], args[1]
    prompts = self.inner.rows_per_shard(prompt_ids)
    rows = prompts * cfg.num_generations
    resident = self.resident or mesh.per_device_bytes(params)
    batch = mesh.per_device_bytes(args[1:3])
    prompt_len = prompt_ids.shape[-1]

    def measure(setting: memory.Chunks):
      fn = self.inner.sampler(dataclasses.replace(cfg, row_chunks=setting.chunks))
      return _compiled(fn, args, resident, batch)

    estimate = lambda s: resident + batch + memory.estimate_sampler(
        self.model_cfg, s, prompts, cfg.num_generations, prompt_len, cfg.max_completion_length)
    choice = memory.choose(memory.chunk_ladder(prompts), measure, self.limit, estimate)
    if choice.setting is None:
      raise memory.nothing_fits(name, choice, self.limit, "use a larger device, fewer prompts "
                                "per step or a shorter max_completion_length")
    self.choices[name] = (choice.setting, choice.bytes)
    log.info("memory: %s: %s of %.1f GiB per device", choice.setting.describe(rows, name),
             memory.size_text(choice.bytes), self.limit / memory.GiB)
    return choice.program

  # The score pass and the update, per completion width.

  def score(self, state, reference, rollout, rewards):
    args = (state, reference, rollout, rewards)
    return self._run(("score", _signature(args)), lambda: self._plan_score(args), args)

  def update(self, state, scored, reference=None):
    args = (state, scored, reference)
    return self._run(("update", _signature(args)), lambda: self._plan_update(args), args)

  def _shape(self, rollout) -> tuple[int, int, int]:
    """(rows per device, sequence length, completion width) of a placed rollout."""
    rows = self.inner.rows_per_shard(rollout.prompt_ids)
    width = rollout.completion_ids.shape[-1]
    return rows, rollout.prompt_ids.shape[-1] + width, width

  def _plan_score(self, args):
    state, reference, rollout, _ = args
    rows, seq_len, width = self._shape(rollout)
    resident = self.note_resident(state, reference)
    batch = mesh.per_device_bytes(args[2:])

    def measure(setting: memory.Score):
      fn = with_step_config(self.inner, score_micro_batch_size=setting.rows).score
      return _compiled(fn, args, resident, batch)

    estimate = lambda s: resident + batch + memory.estimate_score(self.model_cfg, s, seq_len)
    choice = memory.choose(memory.score_ladder(rows), measure, self.limit, estimate)
    if choice.setting is None:
      raise memory.nothing_fits("score pass", choice, self.limit, "use a larger device or "
                                "fewer prompts per step")
    self.choices["score"] = (choice.setting, choice.bytes)
    self._score_line[width] = choice.setting.describe(rows)
    return choice.program

  def _plan_update(self, args):
    state, scored, reference = args
    rows, seq_len, width = self._shape(scored.rollout)
    resident = self.note_resident(state, reference)
    batch = mesh.per_device_bytes(scored)
    trainable = mesh.per_device_bytes(state.params)
    cfg = self.model_cfg

    def measure(setting: memory.Update):
      fn = with_step_config(self.inner, micro_batch_size=setting.rows,
                            remat=setting.remat).update
      return _compiled(fn, args, resident, batch)

    estimate = lambda s: resident + batch + memory.estimate_update(cfg, s, rows, seq_len, trainable)
    ladder = memory.update_ladder(rows, seq_len, self.platform, cfg, self.micro_batch_size,
                                  self.remat)
    choice = memory.choose(ladder, measure, self.limit, estimate)
    describe = lambda s: s.describe(rows)
    if choice.setting is None:
      free = memory.update_ladder(rows, seq_len, self.platform, cfg)
      if self.micro_batch_size or self.remat is not None:  # the config's setting: name one
        alternative = memory.choose(free, measure, self.limit, estimate)
        asked = ", ".join(([f"micro_batch_size={self.micro_batch_size}"]
                           if self.micro_batch_size else [])
                          + ([f"remat={self.remat}"] if self.remat is not None else []))
        raise memory.too_large("update", asked,
                               min(b for _, b in choice.tried if b is not None), self.limit,
                               alternative, lambda s: s.flags(rows))
      raise memory.nothing_fits("update", choice, self.limit, "use a larger device, fewer "
                                "prompts per step or a shorter max_completion_length")
    self.choices["update"] = (choice.setting, choice.bytes)
    score = self._score_line.get(width, "")
    log.info("memory: %d completion positions: %s%s: %s of %.1f GiB per device", width,
             f"{score}, " if score else "", describe(choice.setting),
             memory.size_text(choice.bytes), self.limit / memory.GiB)
    return choice.program


__all__ = ["PlannedStep", "with_step_config"]
