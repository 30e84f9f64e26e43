"""Tunix's GRPOLearner on one benchmark workload; run by benchmarks/compare.py in the Tunix venv.

  /work/bench-tunix/bin/python benchmarks/tunix_driver.py --model DIR --prompts FILE.jsonl \
      --prompts-per-step 4 --num-generations 8 --max-completion-length 64 --steps 6 --out R.json

The checkpoint is loaded with Tunix's own model of its family (config.json's model_type:
`tunix.models.qwen2` or `tunix.models.llama3`) and that family's safetensors loader: the
actor (which the vanilla rollout shares) and, when beta > 0, the reference. One
`GRPOLearner` step is one optimizer step on P prompts x G completions: the vanilla sampler
generates all P*G completions in one call, the reference scores them in one pass, and the
actor takes one AdamW step (no mini-batches, no gradient accumulation, num_iterations 1).

Writes R.json: per-step seconds, per-phase seconds from Tunix's own perf tracer (rollout,
reference pass, actor update), the metrics Tunix logs for each step
(`completions/mean_length` among them), and versions. The reward function (--reward) is
imported from `bench_reward` (compare.py writes it and puts it on PYTHONPATH), the same
module the other systems import; the prompt file's other columns (the smollm2 workload's
`answer`) travel in the training batches, which Tunix hands to the reward as keyword
arguments.

EOS and padding. Tunix's pad id means "no token": its sampler masks pad positions out of
attention and its completion mask is `completion != pad`. A workload whose EOS is id V (one
past the model's V logits, never sampled: every completion full length) pads with that EOS.
A workload with a real EOS (natural lengths) names the pad token with --pad-token: a token
of the vocabulary that is neither the EOS nor in any prompt (the checkpoint's own pad may
be neither: SmolLM2's is <|im_end|>, its EOS, which every chat prompt holds).
"""

from __future__ import annotations

import functools
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
from tunix.generate import tokenizer_adapter
from tunix.models.llama3 import model as llama3_model
from tunix.models.llama3 import params as llama3_params
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
# The loss aggregations of grpo_jax's / TRL's loss types: grpo, a token mean per sequence and
# then the mean over sequences; dapo, the token mean over the whole batch (one micro-batch).
LOSS_AGG_MODES = {"grpo": "sequence-mean-token-mean", "dapo": "token-mean"}


def read_hf_config(model_dir: str) -> dict:
  """The checkpoint's config.json."""
  with open(os.path.join(model_dir, "config.json")) as f:
    return json.load(f)


def model_config(hf: dict):
  """Tunix's config (Qwen2 or Llama3) for a Hugging Face config.json dict."""
  # transformers 5 keeps rope_theta under rope_parameters; older versions at the top level.
  rope = hf.get("rope_parameters") or {}
  rope_theta = hf.get("rope_theta") or rope["rope_theta"]
  if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
    raise ValueError(f"rope scaling {rope or hf['rope_scaling']}: not in Tunix's models")
  shape = dict(
      num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
      embed_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
      num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
      head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
      rope_theta=rope_theta, norm_eps=hf["rms_norm_eps"])
  if hf["model_type"] == "qwen2":
    return qwen2_model.ModelConfig(**shape, use_tied_embedding=hf["tie_word_embeddings"],
                                   dtype=jnp.float32, param_dtype=jnp.float32)
  if hf["model_type"] == "llama":
    # Llama3's config has no dtype fields: it computes in its parameters' dtype (float32).
    return llama3_model.ModelConfig(**shape, weight_tying=hf["tie_word_embeddings"])
  raise ValueError(f"model_type {hf['model_type']!r}: the driver runs qwen2 and llama")


def load_model(model_dir: str, hf: dict, cfg, mesh):
  """The checkpoint as Tunix's model of its family, float32."""
  family = qwen2_params if hf["model_type"] == "qwen2" else llama3_params
  return family.create_model_from_safe_tensors(model_dir, cfg, mesh, dtype=jnp.float32)


def bind_llama_rope_theta(rope_theta: float) -> None:
  """Makes Tunix's Llama3 rotate with the checkpoint's rope_theta.

  Tunix 0.1.7's Llama3 attention calls `apply_rope(x, positions, head_dim=...)` without the
  config's rope_theta, so every Llama gets that function's default base, 1e6 (Llama 3's is
  5e5, SmolLM2's 1e5), and computes other logits than the checkpoint's. The attention looks
  `apply_rope` up in its module at trace time; this binds the base there. A call that passes
  rope_theta itself (a fixed Tunix) still wins: a partial's keywords yield to the call's.
  """
  llama3_model.apply_rope = functools.partial(llama3_model.apply_rope, rope_theta=rope_theta)


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


def batches(rows: list[dict], per_step: int, steps: int):
  """`steps` batches of `per_step` rows, in file order (wrapping around): the prompts under
  "prompts", every other column under its own name (the reward's keyword arguments)."""
  for step in range(steps):
    start = step * per_step
    picked = [rows[(start + i) % len(rows)] for i in range(per_step)]
    # Arrays, not lists: the learner repeats every leaf G times along axis 0.
    batch = {"prompts": np.array([row["prompt"] for row in picked])}
    batch.update({k: np.array([row[k] for row in picked]) for k in picked[0] if k != "prompt"})
    yield batch


def choose_pad(tokenizer, vocab_size: int, pad_token: str | None) -> None:
  """Sets the tokenizer's pad token as Tunix needs it (module docstring, "EOS and padding")."""
  eos_id = tokenizer.eos_token_id
  if eos_id >= vocab_size:  # never sampled: every completion is full length
    tokenizer.pad_token = tokenizer.eos_token
    return
  if pad_token is None:
    raise SystemExit(f"the EOS (id {eos_id}) is in the model's vocabulary: completions end "
                     "early and padding must be told apart from tokens; pass --pad-token")
  pad_id = tokenizer.get_vocab().get(pad_token)
  if pad_id is None or not 0 <= pad_id < vocab_size or pad_id == eos_id:
    raise SystemExit(f"--pad-token {pad_token!r} (id {pad_id}): need a token of the model's "
                     f"vocabulary other than the EOS")
  tokenizer.pad_token = pad_token


def prompt_ids(adapter: tokenizer_adapter.TokenizerAdapter, prompt: str) -> list[int]:
  """The ids Tunix's sampler gives a prompt (`Sampler.tokenize`: the tokenizer's encoding
  after a BOS, a doubled BOS at the start made one)."""
  bos = [adapter.bos_id()] if adapter.bos_id() else []
  return adapter.dedup_bos_ids(bos + adapter.encode(prompt))


def scalar(values, op) -> float | None:
  """One logged metric's value for its step (Tunix's own aggregation), or None for text."""
  arr = np.asarray(values)
  if arr.dtype.kind not in "biuf":  # prompts, completions, trajectory ids ("3_1")
    return None
  arr = arr.astype(np.float64)
  return float(op(arr) if op is not None else arr.mean())


def main():
  p = driver_args.workload_parser()
  p.add_argument("--pad-token", default=None,
                 help="Tunix's pad token where the EOS is a real token (module docstring)")
  a = p.parse_args()

  hf = read_hf_config(a.model)
  cfg = model_config(hf)
  if hf["model_type"] == "llama":
    bind_llama_rope_theta(cfg.rope_theta)
  # Loaded as the generic fast tokenizer it was saved as (AutoTokenizer would pick Qwen2's).
  tokenizer = PreTrainedTokenizerFast.from_pretrained(a.model)
  eos_id = tokenizer.eos_token_id
  choose_pad(tokenizer, cfg.vocab_size, a.pad_token)
  with open(a.prompts) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  adapter = tokenizer_adapter.TokenizerAdapter(tokenizer)
  ids = [prompt_ids(adapter, row["prompt"]) for row in rows]
  if any(tokenizer.pad_token_id in x for x in ids):
    raise SystemExit(f"the pad token {tokenizer.pad_token!r} occurs in a prompt")
  lengths = sorted({len(x) for x in ids})
  if a.max_prompt_length:  # left padding up to it
    prompt_len = a.max_prompt_length
    if lengths[-1] > prompt_len:
      raise SystemExit(f"a prompt has {lengths[-1]} tokens > --max-prompt-length {prompt_len}")
  else:  # one length for all: no padding
    assert len(lengths) == 1, lengths
    prompt_len = lengths[0]

  # One CPU device; every role on the same mesh, so the rollout shares the actor's weights
  # (no weight sync) and Tunix's perf tracer uses its colocated layout.
  mesh = mesh_lib.create_mesh((1, 1), ("fsdp", "tp"))  # Tunix's helper: Auto axis types
  actor = load_model(a.model, hf, cfg, mesh)
  # No reference pass without a KL term (Tunix skips it at beta 0), so no reference copy.
  reference = load_model(a.model, hf, cfg, mesh) if a.beta else None

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
      # The prompts' length or --max-prompt-length: no rounding up to a power of 2.
      max_prompt_length=prompt_len,
      # The sampler's KV cache holds prompt + completion, no more (default: 1024 slots).
      kv_cache_size=prompt_len + a.max_completion_length,
      # Plain categorical sampling (top_p=None would be greedy).
      temperature=a.temperature, top_p=1.0, top_k=None,
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
      loss_agg_mode=LOSS_AGG_MODES[a.loss_type],
      advantage_estimator="grpo", policy_loss_fn="grpo", loss_algo="grpo")
  learner = TimedGRPOLearner(cluster, algo_config, reward_fns=getattr(bench_reward, a.reward),
                             sample_key=jax.random.PRNGKey(a.seed))
  assert not learner.should_sync_weights  # the rollout samples from the actor's own weights
  started = time.perf_counter()
  learner.train(batches(rows, a.prompts_per_step, a.steps))
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
               "pad_token_id": tokenizer.pad_token_id, "model_family": hf["model_type"],
               "loss_agg_mode": algo_config.loss_agg_mode,
               "prompt_lengths": [lengths[0], lengths[-1]],
               "kv_cache_size": rollout_config.kv_cache_size,
               "versions": {"tunix": tunix.__version__, "jax": jax.__version__,
                            "flax": flax.__version__, "optax": optax.__version__}}, f)


if __name__ == "__main__":
  main()
