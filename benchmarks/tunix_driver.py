"""Tunix's GRPOLearner on one benchmark workload; run by benchmarks/compare.py in the Tunix venv.

  /work/bench-tunix/bin/python benchmarks/tunix_driver.py --model DIR --prompts FILE.jsonl \
      --prompts-per-step 4 --num-generations 8 --max-completion-length 64 --steps 6 --out R.json

The checkpoint is loaded with Tunix's own Qwen2 (`tunix.models.qwen2`) and its safetensors
loader, twice: the actor (which the vanilla rollout shares) and the reference. One
`GRPOLearner` step is one optimizer step on P prompts x G completions: the vanilla sampler
generates all P*G completions in one call, the reference scores them in one pass, and the
actor takes one AdamW step (no mini-batches, no gradient accumulation, num_iterations 1).

Writes R.json: per-step seconds, per-phase seconds from Tunix's own perf tracer (rollout,
reference pass, actor update), the metrics Tunix logs for each step
(`completions/mean_length` among them), and versions. The reward function is imported from
`bench_reward` (compare.py writes it and puts it on PYTHONPATH), the same module the other
systems import.
"""

from __future__ import annotations

import json
import os
import time

import bench_reward  # written by compare.py beside the workload's files, on PYTHONPATH
import driver_args  # benchmarks/driver_args.py, beside this script
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tunix
from flax import nnx
from transformers import PreTrainedTokenizerFast
from tunix.models.qwen2 import model as qwen2_model
from tunix.models.qwen2 import params as qwen2_params
from tunix.perf import export as perf_export
from tunix.perf import metrics as perf_metrics
from tunix.perf import trace as perf_trace
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner
from tunix.rl.rollout import base_rollout
from tunix.utils import mesh as mesh_lib

# Per-phase seconds of a step, from the spans that Tunix's perf tracer records on the device
# timeline: the phase -> (span name, the metric name that phase_export logs it under).
PHASES = {"rollout": ("rollout", "perf/device/rollout_time"),
          "reference": ("refer_inference", "perf/device/refer_inference_time"),
          "actor_update": ("peft_train_step", "perf/device/actor_train_step_time")}


def model_config(model_dir: str) -> qwen2_model.ModelConfig:
  """Tunix's Qwen2 config for the Hugging Face checkpoint in `model_dir` (its config.json)."""
  with open(os.path.join(model_dir, "config.json")) as f:
    hf = json.load(f)
  # transformers 5 keeps rope_theta under rope_parameters; older versions at the top level.
  rope_theta = hf.get("rope_theta") or hf["rope_parameters"]["rope_theta"]
  return qwen2_model.ModelConfig(
      num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
      embed_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
      num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
      head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
      rope_theta=rope_theta, norm_eps=hf["rms_norm_eps"],
      use_tied_embedding=hf["tie_word_embeddings"],
      dtype=jnp.float32, param_dtype=jnp.float32)


def phase_export(cluster_config: rl_cluster_lib.ClusterConfig):
  """A perf export function: Tunix's standard metrics plus device-timeline phase times.

  Tunix's standard export (colocated layout) times the actor update from the host thread:
  `actor_train_time` starts while the reference pass is still running (it is dispatched
  asynchronously) and `actor_train_step_time` ends at dispatch. The device timeline that
  the same tracer keeps has each span start when the previous one ends there, so rollout,
  reference pass and actor update partition the device's time.
  """
  standard = perf_export.PerfMetricsExport.from_cluster_config(cluster_config)
  mesh = cluster_config.role_to_mesh[rl_cluster_lib.Role.ACTOR]
  device = perf_trace.create_device_timeline_id(mesh.devices.flatten()[0])

  def export(query: perf_metrics.PerfSpanQuery) -> perf_metrics.MetricsT:
    metrics = dict(standard(query))
    groups = (query().timeline(device).last_group("global_step").all_groups("mini_batch_step")
              .all_groups("micro_batch_steps").get())
    for span_name, metric in PHASES.values():
      spans = []
      for group in groups:
        spans += group.find_all_inner_spans(span_name)
        for training in group.find_all_inner_groups("actor_training"):
          spans += training.find_all_inner_spans(span_name)
      if spans:
        metrics[metric] = (sum(x.duration for x in spans), None)
    return metrics

  return export


class TimedGRPOLearner(grpo_learner.GRPOLearner):
  """GRPOLearner that times each global step and gives each step's sampling a fresh key.

  One global step here is one optimizer step (mini_batch_size = the full batch): rollout,
  rewards and advantages, reference log-probs, and the actor's update. The update is
  dispatched asynchronously, so the step ends when the actor's new parameters are ready.
  """

  def __init__(self, *args, sample_key: jax.Array, **kwargs):
    super().__init__(*args, **kwargs)
    self.step_seconds: list[float] = []
    self._sample_key = sample_key

  def _run_global_step(self, *args, **kwargs):
    # The vanilla rollout samples with RolloutConfig.seed, PRNGKey(0) when it is None: the
    # same key every step unless it is changed. The key is a traced argument of the jitted
    # sampler, so a new one each step does not recompile.
    rollout_config = self.rl_cluster.get_rollout_config(rl_cluster_lib.Mode.TRAIN)
    rollout_config.seed = jax.random.fold_in(self._sample_key, len(self.step_seconds))
    started = time.perf_counter()
    super()._run_global_step(*args, **kwargs)
    jax.block_until_ready(nnx.state(self.rl_cluster.actor_trainer.model))
    self.step_seconds.append(time.perf_counter() - started)
    # Device spans are closed by waiting threads; let them finish before the learner exports
    # this step's perf metrics (outside the timed step).
    self.rl_cluster.perf.synchronize()


def batches(prompts: list[str], per_step: int, steps: int):
  """`steps` batches of `per_step` prompts, in file order (wrapping around)."""
  for step in range(steps):
    start = step * per_step
    picked = [prompts[(start + i) % len(prompts)] for i in range(per_step)]
    # An array, not a list: the learner repeats every leaf G times along axis 0.
    yield {"prompts": np.array(picked)}


def scalar(values, op) -> float | None:
  """One logged metric's value for its step (Tunix's own aggregation), or None for text."""
  arr = np.asarray(values)
  if arr.dtype.kind not in "biuf":  # prompts, completions, trajectory ids ("3_1")
    return None
  arr = arr.astype(np.float64)
  return float(op(arr) if op is not None else arr.mean())


def main():
  p = driver_args.workload_parser()
  a = p.parse_args()

  cfg = model_config(a.model)
  # Loaded as the generic fast tokenizer it was saved as (AutoTokenizer would pick Qwen2's).
  tokenizer = PreTrainedTokenizerFast.from_pretrained(a.model)
  eos_id = tokenizer.eos_token_id
  assert eos_id == cfg.vocab_size, (eos_id, cfg.vocab_size)  # never sampled: full length
  # Tunix uses the pad id as "no token": its sampler masks pad positions out of attention and
  # its completion mask is `completion != pad`. With the checkpoint's pad (<pad>, id 0), an
  # ordinary sampled id 0 would drop out of attention and of the loss. The other systems mask
  # only after EOS, so Tunix gets pad = EOS = V, an id that the model never produces. No
  # prompt is padded (they all have one length), so prompt ids are unchanged.
  tokenizer.pad_token = tokenizer.eos_token
  with open(a.prompts) as f:
    prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
  prompt_lengths = {len(tokenizer.encode(x)) for x in prompts}
  assert len(prompt_lengths) == 1, prompt_lengths
  prompt_len = prompt_lengths.pop()

  # One CPU device; every role on the same mesh, so the rollout shares the actor's weights
  # (no weight sync) and Tunix's perf tracer uses its colocated layout.
  mesh = mesh_lib.create_mesh((1, 1), ("fsdp", "tp"))  # Tunix's helper: Auto axis types
  actor = qwen2_params.create_model_from_safe_tensors(a.model, cfg, mesh, dtype=jnp.float32)
  reference = qwen2_params.create_model_from_safe_tensors(a.model, cfg, mesh,
                                                          dtype=jnp.float32)

  optimizer = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(learning_rate=a.learning_rate, b1=0.9, b2=0.999, eps=1e-8,
                  weight_decay=0.0))
  training_config = rl_cluster_lib.RLTrainingConfig(
      actor_optimizer=optimizer,
      max_steps=a.steps,
      eval_every_n_steps=a.steps + 1,  # no eval dataset is passed either
      # None: one mini-batch = the full batch of P prompts (x G), one micro-batch, so one
      # optimizer step per global step; rollout and log-prob passes also in one call each.
      mini_batch_size=None, train_micro_batch_size=None,
      rollout_micro_batch_size=None, compute_logps_micro_batch_size=None,
      checkpoint_root_directory=None,  # no checkpoints
      metrics_logging_options=None,  # metrics kept in memory only (no TensorBoard, no W&B)
  )
  rollout_config = base_rollout.RolloutConfig(
      max_tokens_to_generate=a.max_completion_length,
      max_prompt_length=prompt_len,  # exact: no left padding, no rounding up to a power of 2
      # The sampler's KV cache holds prompt + completion, no more (default: 1024 slots).
      kv_cache_size=prompt_len + a.max_completion_length,
      temperature=1.0, top_p=1.0, top_k=None,  # plain categorical sampling (top_p=None: greedy)
      eos_tokens=[eos_id],
      data_type=jnp.float32,
  )
  cluster_config = rl_cluster_lib.ClusterConfig(
      role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                    rl_cluster_lib.Role.ROLLOUT: mesh},
      rollout_engine="vanilla", offload_to_cpu=False,
      training_config=training_config, rollout_config=rollout_config)
  perf_config = perf_metrics.PerfMetricsConfig(custom_export_fn=phase_export(cluster_config))
  cluster = rl_cluster_lib.RLCluster(actor=actor, reference=reference, tokenizer=tokenizer,
                                     cluster_config=cluster_config, perf_config=perf_config)
  buffers: list[dict] = []

  def keep_metrics(buffer):
    """Tunix's per-step metric buffer, as numbers (prompts and completions left out)."""
    values = {name: scalar(v, op) for name, (v, op) in buffer.metrics.items()}
    buffers.append({"step": buffer.global_steps, "mode": buffer.mode,
                    **{k: v for k, v in values.items() if v is not None}})

  cluster.with_external_metrics_logger(keep_metrics)

  algo_config = grpo_learner.GRPOConfig(
      num_generations=a.num_generations, num_iterations=1, beta=a.beta, epsilon=0.2,
      kl_loss_mode="low_var_kl",  # k3: exp(ref - logp) - (ref - logp) - 1
      loss_agg_mode="sequence-mean-token-mean",  # token mean per sequence, then sequence mean
      advantage_estimator="grpo", policy_loss_fn="grpo", loss_algo="grpo")
  learner = TimedGRPOLearner(cluster, algo_config, reward_fns=bench_reward.length_mod7,
                             sample_key=jax.random.PRNGKey(a.seed))
  assert not learner.should_sync_weights  # the rollout samples from the actor's own weights
  started = time.perf_counter()
  learner.train(batches(prompts, a.prompts_per_step, a.steps))
  train_wall = time.perf_counter() - started

  # Tunix flushes a step's buffer when the next one starts; the perf exporter runs after the
  # step counter moves on, so step k's phase times sit in buffer k + 1.
  train = sorted((b for b in buffers if b["mode"] == "train"), key=lambda b: b["step"])
  by_step: dict[int, dict] = {}
  for b in train:
    by_step.setdefault(b["step"], {}).update(b)
  steps = range(len(learner.step_seconds))
  mean_lengths = [by_step.get(s, {}).get("completions/mean_length") for s in steps]
  phases = [{name: by_step.get(s + 1, {}).get(metric) for name, (_, metric) in PHASES.items()}
            for s in steps]
  history = cluster.actor_trainer.metrics_logger
  losses = [float(x) for x in history.get_metric_history("actor", "loss", "train")]
  with open(a.out, "w") as f:
    json.dump({"step_seconds": learner.step_seconds, "mean_lengths": mean_lengths,
               "phase_seconds": phases, "actor_losses": losses, "train_wall": train_wall,
               "logs": list(by_step.values()), "eos_token_ids": [eos_id],
               "pad_token_id": tokenizer.pad_token_id,
               "kv_cache_size": rollout_config.kv_cache_size,
               "versions": {"tunix": tunix.__version__, "jax": jax.__version__,
                            "flax": flax.__version__, "optax": optax.__version__}}, f)


if __name__ == "__main__":
  main()
