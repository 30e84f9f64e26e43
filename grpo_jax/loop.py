"""The training loop: `TrainLoop` wires the compiled step, the host rewards, dynamic
sampling, the reference sync, evaluation, metrics and checkpoints. Orchestration only.

A step, as the data flows (`TrainLoop.train_step`):
  prompts -> sampler -> rewards (-> more rounds, dynamic sampling) -> score -> update
  (-> reference sync) -> writers
The sampling key of step s is fold_in(seed key, s) (round r > 0 of a step with dynamic
sampling: fold_in of that, r); the data position and the log window are checkpointed, so a
resumed run follows the same trajectory and logs the same records.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from clu import periodic_actions
from flax import nnx

from grpo_jax import (checkpoint, dynamic_sampling, grpo, hosts, metrics, preemption, rollouts,
                      sampling)
from grpo_jax import config as config_lib
from grpo_jax.data import batching
from grpo_jax.errors import UserError
from grpo_jax.evaluate import Evaluator, greedy_config
from grpo_jax.models import hf, lora, peft_format
from grpo_jax.tools import host as tools_host
from grpo_jax.tools import stats as tool_stats

log = logging.getLogger("grpo_jax")


class NonFiniteWatch:
  """Counts updates the step skipped (non-finite loss or gradient norm, or no reward at
  all): a warning per such step, an error after `limit` in a row."""

  def __init__(self, limit: int):
    self.limit, self.in_a_row = limit, 0

  def __call__(self, step: int, step_metrics: dict[str, float], last_checkpoint: str) -> None:
    if not step_metrics.get("nonfinite_skipped"):
      self.in_a_row = 0
      return
    self.in_a_row += 1
    if step_metrics.get("dynamic_sampling/kept_groups", 1.0) == 0:
      why = (f"dynamic sampling found no group with a reward spread in "
             f"{step_metrics['dynamic_sampling/rounds']:.0f} rounds")
    elif np.isnan(step_metrics.get("reward", 0.0)):
      why = "no reward function scored any completion"
    else:
      why = (f"loss {step_metrics.get('loss')}, grad_norm {step_metrics.get('grad_norm')}")
    log.warning("Step %d: update skipped, params and optimizer state unchanged (%s)", step, why)
    if self.in_a_row >= self.limit:
      raise UserError(f"{self.in_a_row} updates in a row were skipped (steps "
                      f"{step - self.in_a_row + 1}-{step}; last: {why}); stopped at "
                      f"max_nonfinite_steps={self.limit}; {last_checkpoint}")


class TrainLoop:
  """Runs the steps of a run on a compiled step (`layout`: pmap or mesh layout).

  `s`: the run's `build.Setup`; its `init_params` are taken over by `run`.
  """

  def __init__(self, config, s, layout, ckpt: checkpoint.Checkpointer, writer, logdir):
    self.config, self.s, self.ckpt, self.writer, self.logdir = config, s, ckpt, writer, logdir
    self.layout = layout
    schemas = s.tools.schemas if s.tools else None
    self.host = rollouts.HostRollouts(s.tokenizer, s.reward_funcs, config,
                                      config.num_generations, schemas)
    self.sampler = self.make_sampler(s.grpo_config.sampling)
    self.tool_stats: list[tool_stats.ToolStats] = []  # this step's, over its sampling rounds
    self.train_width = rollouts.TrainWidths(config.train_length_bucket,
                                            config.max_completion_length)
    # Each host feeds its own devices: a disjoint share of every global batch.
    self.stream = batching.PromptStream(s.train_data, config.prompts_per_step,
                                        seed=config.seed, process_index=jax.process_index(),
                                        process_count=jax.process_count())
    self.evaluate = (Evaluator(
        s, config, layout, self.make_sampler(greedy_config(s.grpo_config.sampling)),
        schemas) if s.eval_data is not None and config.eval_every else None)
    self.nonfinite = NonFiniteWatch(config.max_nonfinite_steps)
    self.short_batches = dynamic_sampling.ShortBatchWarnings(config.max_num_gen_batches)
    self.window = metrics.MetricWindow()
    self.updates = 0  # optimizer updates so far (state.step), read when the reference syncs
    self.saved_any = False
    self.saved_step = 0  # the newest step handed to the checkpointer (or resumed from)

  def make_sampler(self, cfg: sampling.SamplingConfig):
    """Single-turn decoding, or with tools / environment_factory multi-turn rollouts."""
    if self.s.tools is None:
      return rollouts.SingleTurnSampler(self.layout, cfg)
    return tools_host.ToolSampler(self.s.tools, self.s.tokenizer, self.layout, cfg,
                                  self.config.max_tool_calling_iterations,
                                  self.config.tool_timeout_seconds)

  def resume_hint(self) -> str:
    if not self.config.checkpoint_every:
      return "no checkpoint is written (checkpoint_every=0): a rerun starts over"
    where = self.ckpt.directory
    if not self.saved_step:
      return f"no checkpoint yet in {where}: a rerun starts over"
    return (f"the newest complete checkpoint in {where} (step {self.saved_step} or earlier) "
            "is where the same command resumes")

  def restore_or_init(self, params, restored):
    """(placed train state, placed reference params, base key), restored or fresh.

    The optimizer state is created on the devices, and no host copy of the params is
    kept beyond this call: at 0.5B parameters every extra copy costs 2 GB.
    """
    layout, config = self.layout, self.config
    fresh_key = jax.random.key(config.seed)
    if self.s.uses_lora:
      return self.restore_or_init_adapters(params, restored, fresh_key)
    keep = config_lib.keeps_reference(config)  # else no reference pass: none is held
    if restored is not None:
      reference = restored.reference
      if reference is None and keep:  # unreadable: the starting params are the same weights
        reference = params
        self.save_reference(params)
      state, key = self.resume(restored, fresh_key)
      return state, self.place_reference(reference) if keep else None, key
    if keep:
      self.save_reference(params)
    actor = layout.place_params(params)
    return layout.init_state(actor), self.place_reference(params) if keep else None, fresh_key

  def resume(self, restored, fresh_key):
    """(placed train state, base key) of a restored checkpoint; the data stream, metric
    window and update count resume with it. The saved key is used unless the seed changed
    (allow_config_change)."""
    self.stream.restore(restored.meta["data"])
    self.window.restore(restored.meta.get("metrics_window"))
    self.updates = int(np.asarray(restored.state.step))
    saved_key = restored.meta.get("rng")
    same_seed = restored.meta.get("config", {}).get("seed", self.config.seed) == self.config.seed
    key = (jax.random.wrap_key_data(np.asarray(saved_key, np.uint32))
           if saved_key is not None and same_seed else fresh_key)
    self.saved_step = restored.step
    log.info("Resumed from the checkpoint of step %d", restored.step)
    return self.layout.place_state(restored.state), key

  def restore_or_init_adapters(self, base, restored, fresh_key):
    """LoRA's (placed adapter train state, placed base, base key): the base is frozen and
    is the reference, placed once and never checkpointed; the adapters are restored or
    start fresh (B = 0: step 0 is the base model)."""
    lora_cfg = self.s.model_config.lora
    log.info("LoRA rank %d (alpha %g, dropout %g) on %s: %s trainable of %s parameters; the "
             "frozen base (%s, quantisation %s) is the reference, so no reference copy is "
             "kept or checkpointed", lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout,
             ",".join(lora_cfg.targets), f"{lora.num_params(self.s.adapters_like):,}",
             f"{lora.num_params(base):,}", self.config.lora.base_dtype,
             self.config.lora.base_quantization)
    reference = self.place_reference(base)
    if restored is not None:
      state, key = self.resume(restored, fresh_key)
      return state, reference, key
    adapters = lora.init_adapters(self.s.adapters_like, jax.random.fold_in(fresh_key, 1))
    return self.layout.init_state(self.layout.place_params(adapters)), reference, fresh_key

  def save_reference(self, params) -> None:
    if self.config.checkpoint_every:
      self.ckpt.save_reference(params)

  def place_reference(self, params):
    """The reference on the devices, in its compute dtype; with LoRA the base, also in
    lora.base_dtype and quantised per lora.base_quantization."""
    if self.s.uses_lora:
      params = lora.prepare_base(params, self.config.lora.base_dtype,
                                 self.config.lora.base_quantization)
    return self.layout.place_params(grpo.as_reference(params,
                                                      self.s.model_config.compute_dtype))

  def policy(self, state, reference):
    """The actor's whole (placed) state: with LoRA the adapters on the base."""
    return self.layout.step.policy_params(state.params, reference)

  def is_due(self, every: int, step: int, last: bool = False) -> bool:
    """Periodic actions (eval, checkpoint): every `every` steps and at the last; 0: never."""
    return bool(every) and (step % every == 0 or step == self.config.max_steps or last)

  def out_of_time(self, deadline: float | None) -> bool:
    """Whether the time budget (`max_train_minutes`) is spent; every host agrees."""
    return deadline is not None and bool(hosts.agree(time.monotonic() >= deadline, np.any))

  def run(self, restored, stop: preemption.StopRequests) -> None:
    config = self.config
    params, self.s.init_params = self.s.init_params, None  # the loop owns the only copy now
    state, reference, base_key = self.restore_or_init(params, restored)
    del params
    self.layout.note_resident(state, reference)  # the memory plan counts it in every program
    start_step = restored.step if restored else 0
    if stop.requested():  # during setup or the warm-up
      raise preemption.Preempted(stop.signum, (
          f"stopped by {preemption.signal_name(stop.signum)} before training step "
          f"{start_step + 1}; {self.resume_hint()}"))
    progress = metrics.ProgressLine(config.max_steps, start_step=start_step)
    report = periodic_actions.ReportProgress(num_train_steps=config.max_steps,
                                             writer=self.writer)
    if self.evaluate and (start_step == 0 or restored.meta.get("pending_eval")):
      progress.update(start_step, self.log_eval(state, reference, start_step))
    done = start_step
    deadline = (time.monotonic() + 60 * config.max_train_minutes
                if config.max_train_minutes else None)
    progress.set_deadline(deadline)
    for step in range(start_step + 1, config.max_steps + 1):
      if stop.requested():
        break
      position = self.stream.state()
      outcome = self.train_step(state, reference, jax.random.fold_in(base_key, step), stop)
      if outcome is None:  # stopped before its update: the resumed run samples it again
        self.stream.restore(position)
        break
      state, reference, step_metrics = outcome
      done = step
      report(step)
      last = step == config.max_steps or self.out_of_time(deadline)
      self.window.add(step_metrics)
      if step % config.log_every == 0 or last:
        self.writer.write_scalars(step, self.window.pop())
      self.nonfinite(step, step_metrics, self.resume_hint())
      eval_due = self.evaluate is not None and self.is_due(config.eval_every, step, last)
      if stop.requested():  # an evaluation can take minutes: the resumed run does it
        progress.update(step, step_metrics)
        self.save(step, state, reference, base_key, pending_eval=eval_due)
        break
      # One line per step, after its evaluation: the line's accuracy is this step's.
      progress.update(step, {**step_metrics, **(
          self.log_eval(state, reference, step) if eval_due else {})})
      if self.is_due(config.checkpoint_every, step, last):
        self.save(step, state, reference, base_key)
      if last and step < config.max_steps:
        log.info("max_train_minutes=%g spent: step %d is the last of this run (rerun the "
                 "same command to continue from its checkpoint)", config.max_train_minutes,
                 step)
        break
    progress.close()
    if stop.signum is not None and done > self.saved_step:  # (save: never if checkpoint_every=0)
      self.save(done, state, reference, base_key)
    self.ckpt.wait()
    self.writer.flush()
    if stop.signum is not None:  # the checkpoint is complete now (waited for above)
      where = (f"checkpoint of step {self.saved_step} saved in {self.ckpt.directory}: rerun "
               "the same command to resume" if self.saved_step else self.resume_hint())
      raise preemption.Preempted(stop.signum, (
          f"stopped by {preemption.signal_name(stop.signum)} after step {done} of "
          f"{config.max_steps}; {where}"))
    if hosts.is_primary():
      metrics.plot_curves(str(self.logdir))
    if config.export_hf and hosts.is_primary():
      self.export(state, reference)

  def train_step(self, state, reference, key, stop):
    """One GRPO step: prompts -> sampler -> rewards (-> dynamic sampling) -> score ->
    update (-> reference sync). (state, reference, metrics), or None when a stop was
    requested before the update began (state untouched)."""
    config, layout = self.config, self.layout
    times = {"time/sampling": 0.0, "time/rewards": 0.0}
    self.tool_stats = []
    started = time.perf_counter()
    batch = self.sample(self.policy(state, reference), key, stop, times)
    if batch is None:
      return None
    scoring = time.perf_counter()
    rollout = self.place_rollout(batch)
    scored, reward_metrics = layout.score(state, reference, rollout,
                                          layout.place_batch(batch.rewards))
    if batch.rows_in_loss is not None:  # filler rows: out of the loss and its normalisation
      scored = scored._replace(rows_in_loss=layout.place_batch(batch.rows_in_loss))
    state, update_metrics = layout.update(state, scored, reference)
    reference = self.sync_reference(reference, state)
    step_metrics = self.host.named_metrics(layout.host_metrics({**reward_metrics,
                                                                **update_metrics}))
    if config.dynamic_sampling:  # the filler out of the reward metrics; rounds, kept groups
      step_metrics = dynamic_sampling.with_sampling_metrics(
          batch, step_metrics, config.prompts_per_step, dynamic_sampling.scales_per_group(
              config.scale_rewards, config.multi_objective_aggregation))
      self.short_batches(step_metrics, config.prompts_per_step)
    if self.tool_stats:  # calls, failures and turns of every completion sampled this step
      step_metrics.update(tool_stats.concatenate_tool_stats(self.tool_stats).metrics())
    finished = time.perf_counter()
    step_metrics.update(dynamic_sampling.throughput(batch, finished - started))
    # Where the step went: prompts + sampling, host reward functions, reference + update.
    step_metrics.update({**times, "time/update": finished - scoring})
    return state, reference, step_metrics

  def sample(self, params, key, stop, times):
    """The step's batch (`dynamic_sampling.Gathered`): one sampling round, or with
    dynamic sampling as many as it takes to gather prompts_per_step informative groups
    (at most max_num_gen_batches). None when a stop was requested."""
    config = self.config
    keep = None
    if config.dynamic_sampling:
      weights = self.s.grpo_config.weights
      keep = lambda rewards: dynamic_sampling.informative_groups(
          rewards, weights, config.num_generations, config.multi_objective_aggregation)
    gatherer = dynamic_sampling.GroupGatherer(
        config.prompts_per_step // jax.process_count(), config.num_generations, keep)

    def sample_round(round_index: int):
      # Round 0 keeps the step's key: without dynamic sampling the run is unchanged.
      round_key = key if round_index == 0 else jax.random.fold_in(key, round_index)
      started = time.perf_counter()
      rows = self.stream.next_batch()
      prompt_ids, prompt_mask = self.host.encode(rows)
      placed, turns = self.sampler(params, prompt_ids, prompt_mask, round_key, rows)
      host_rollout = self.layout.to_host(placed)  # waits for the sampler
      if stop.requested():
        return None
      sampled = time.perf_counter()
      rewards, _ = self.host.score(rows, host_rollout, turns=turns)
      if turns is not None:
        self.tool_stats.append(turns.stats)
      if stop.requested():
        return None
      times["time/sampling"] += sampled - started
      times["time/rewards"] += time.perf_counter() - sampled
      return host_rollout, rewards, placed

    return dynamic_sampling.gather(sample_round, gatherer, config.max_num_gen_batches)

  def place_rollout(self, batch: dynamic_sampling.Gathered):
    """The batch's rollout on the devices, cut to the width its completions need."""
    width = self.train_width(batch.rollout)
    if width < self.config.max_completion_length:  # every completion stopped well before it
      return self.layout.place_batch(sampling.trim_completions(batch.rollout, width))
    if batch.placed is not None:  # the round's own rollout, still on the devices
      return batch.placed
    return self.layout.place_batch(batch.rollout)

  def sync_reference(self, reference, state):
    """TR-DPO: the reference moves toward the actor each time the optimizer-update count
    passes a multiple of ref_model_sync_steps."""
    config = self.config
    if not config.sync_ref_model:
      return reference
    before = self.updates
    self.updates = int(np.asarray(jax.device_get(self.layout.single_copy(state.step))))
    if not grpo.sync_due(before, self.updates, config.ref_model_sync_steps):
      return reference
    log.info("Reference synced with the actor after update %d (alpha %g)", self.updates,
             config.ref_model_mixup_alpha)
    return grpo.mix_reference(reference, state.params, config.ref_model_mixup_alpha)

  def save(self, step: int, state, reference, base_key, pending_eval: bool = False) -> None:
    """Checkpoints `state` as of `step` (asynchronously), with what a resume needs: the
    reference too where it moves (sync_ref_model)."""
    if not self.config.checkpoint_every:
      return
    moved = self.layout.single_copy(reference) if self.config.sync_ref_model else None
    self.ckpt.save(step, self.layout.single_copy(state), {
        "data": self.stream.state(), "rng": jax.random.key_data(base_key).tolist(),
        "config": config_lib.as_json(self.config), "dataset": self.s.data_fingerprint,
        "pending_eval": pending_eval,
        "metrics_window": self.window.state()}, reference=moved)
    self.saved_any, self.saved_step = True, step

  def export(self, state, reference) -> None:
    """The final actor as a Hugging Face checkpoint (transformers / vLLM can load it); with
    LoRA either merged into its base (export_format="merged") or as a PEFT adapter folder
    ("peft") for the base model at model_path (the demo's base is written beside it)."""
    path = self.logdir.parent / self.config.export_hf  # an absolute export_hf stays as is
    params = self.layout.single_copy(state.params)
    if not self.s.uses_lora:
      hf.save_pretrained(nnx.merge(self.s.model_def, params), os.fspath(path), self.s.tokenizer)
      log.info("Exported the final actor to %s", path)
      return
    lora_cfg, base = self.s.model_config.lora, self.layout.single_copy(reference)
    if self.config.export_format == "merged":
      merged = lora.merged_kernels(base, params, lora_cfg)
      hf.save_pretrained(nnx.merge(self.s.reference_def, merged), os.fspath(path),
                         self.s.tokenizer)
      log.info("Exported the final actor (LoRA merged into its base) to %s", path)
      return
    base_path = self.config.model_path
    if not base_path:  # a base that exists nowhere else (the demo's warmed-up model)
      base_path = os.fspath(path / "base")
      hf.save_pretrained(nnx.merge(self.s.reference_def, lora.merged_kernels(
          base, jax.tree.map(jnp.zeros_like, params), lora_cfg)), base_path, self.s.tokenizer)
    peft_format.save_adapter(params, self.s.model_config, os.fspath(path), base_path,
                             self.s.tokenizer)
    log.info("Exported the LoRA adapters (PEFT format, base %s) to %s", base_path, path)

  def log_eval(self, state, reference, step: int) -> dict[str, float]:
    """Evaluates, writes the eval metrics and samples, redraws the curves; the metrics."""
    result = self.evaluate(self.policy(state, reference))
    self.writer.write_scalars(step, result.metrics)
    self.writer.write_texts(step, {"samples": result.sample_text})
    self.writer.flush()
    if hosts.is_primary():
      metrics.plot_curves(str(self.logdir))
    return result.metrics
