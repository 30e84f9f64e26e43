"""TRL's GRPOTrainer on one benchmark workload; run by benchmarks/compare.py in the TRL venv.

  /work/bench-trl/bin/python benchmarks/trl_driver.py --model DIR --prompts FILE.jsonl \
      --prompts-per-step 4 --num-generations 8 --max-completion-length 64 --steps 6 --out R.json

Writes R.json: per-step seconds (on_step_begin -> on_step_end: generation, rewards, reference
and actor log-probs, backward, AdamW step), the logged metrics of every step, and versions.
The reward function (--reward) is imported from `bench_reward` (compare.py writes it and puts
it on PYTHONPATH), the same module grpo_jax imports, so both systems score with identical
code; the prompt file's other columns (the smollm2 workload's `answer`) reach it as keyword
arguments. Completions end at the checkpoint's EOS (generation_config.json's eos_token_id
and the tokenizer's), whatever the workload makes of it.
"""

from __future__ import annotations

import json
import time

import bench_reward  # written by compare.py beside the workload's files, on PYTHONPATH
import driver_args  # benchmarks/driver_args.py, beside this script
import torch
import transformers
import trl
from datasets import load_dataset
from transformers import PreTrainedTokenizerFast, TrainerCallback
from trl import GRPOConfig, GRPOTrainer


def synchronize():
  if torch.cuda.is_available():
    torch.cuda.synchronize()


class StepTimer(TrainerCallback):
  """Seconds per optimizer step, and every metric TRL logs (one log per step)."""

  def __init__(self):
    self.started = None
    self.step_seconds: list[float] = []
    self.logs: list[dict] = []

  def on_step_begin(self, args, state, control, **kwargs):
    synchronize()
    self.started = time.perf_counter()

  def on_step_end(self, args, state, control, **kwargs):
    synchronize()
    self.step_seconds.append(time.perf_counter() - self.started)

  def on_log(self, args, state, control, logs=None, **kwargs):
    if logs:
      self.logs.append({"step": state.global_step, **logs})


def time_phases(trainer) -> dict[str, list[float]]:
  """Seconds of each step's phases, by wrapping the trainer's own methods: `sampling`
  (`_generate`: HF generate), `score` (the rest of `_generate_and_score_completions`: rewards,
  old and reference log-probs)."""
  phases: dict[str, list[float]] = {"sampling": [], "generate_and_score": []}

  def timed(name, fn):
    def wrapper(*args, **kwargs):
      synchronize()
      started = time.perf_counter()
      out = fn(*args, **kwargs)
      synchronize()
      phases[name].append(time.perf_counter() - started)
      return out
    return wrapper

  trainer._generate = timed("sampling", trainer._generate)
  trainer._generate_and_score_completions = timed(
      "generate_and_score", trainer._generate_and_score_completions)
  return phases


def main():
  p = driver_args.workload_parser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
  p.add_argument("--bf16", action="store_true", help="TRL's GPU default (compare.py: off)")
  p.add_argument("--gradient-checkpointing", action="store_true",
                 help="TRL's GPU default (compare.py: off, as grpo_jax's remat)")
  a = p.parse_args()

  batch = a.prompts_per_step * a.num_generations
  # Loaded as the generic fast tokenizer it was saved as: AutoTokenizer / AutoProcessor would
  # swap in Qwen2's tokenizer class for a qwen2 config and re-tokenize the prompts differently.
  tokenizer = PreTrainedTokenizerFast.from_pretrained(a.model)
  # --max-prompt-length is not passed on: TRL 1.x has no prompt limit (it pads each batch's
  # prompts to the longest of them), and compare.py's prompts all fit within it.
  args = GRPOConfig(
      output_dir=a.workdir,
      max_steps=a.steps,
      per_device_train_batch_size=batch,  # one optimizer step = P prompts x G completions
      generation_batch_size=batch,  # generate once per step (steps_per_generation = 1)
      gradient_accumulation_steps=1,
      num_generations=a.num_generations,
      max_completion_length=a.max_completion_length,
      temperature=a.temperature, top_p=1.0, top_k=0,
      beta=a.beta, epsilon=0.2, num_iterations=1,
      # TRL 1.x defaults to "dapo"; compare.py passes "grpo" (grpo_jax's default and the
      # paper's) except where the workload follows a recipe that uses "dapo".
      loss_type=a.loss_type,
      scale_rewards="group",
      learning_rate=a.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
      optim="adamw_torch", weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
      adam_epsilon=1e-8, max_grad_norm=1.0,
      # TRL 1.x defaults to bf16=True and gradient_checkpointing=True; compare.py runs both
      # off (float32, as grpo_jax; remat off), the GPU side-by-side both ways.
      bf16=a.bf16, fp16=False, gradient_checkpointing=a.gradient_checkpointing,
      model_init_kwargs={"dtype": "bfloat16" if a.bf16 else "float32"},
      use_vllm=False, use_cpu=a.device == "cpu",
      logging_steps=1, log_completions=False, save_strategy="no", report_to="none",
      seed=a.seed, data_seed=a.seed, dataloader_num_workers=0, disable_tqdm=True,
  )
  dataset = load_dataset("json", data_files=a.prompts, split="train")
  timer = StepTimer()
  trainer = GRPOTrainer(model=a.model, reward_funcs=getattr(bench_reward, a.reward),
                        args=args, train_dataset=dataset, processing_class=tokenizer,
                        callbacks=[timer])
  phases = time_phases(trainer)
  if a.device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  trainer.train()
  with open(a.out, "w") as f:
    json.dump({"step_seconds": timer.step_seconds, "logs": timer.logs,
               "phase_seconds": {
                   "sampling": phases["sampling"],
                   "score": [both - gen for both, gen in zip(phases["generate_and_score"],
                                                              phases["sampling"])]},
               "peak_memory_bytes": (torch.cuda.max_memory_allocated()
                                     if a.device == "cuda" else None),
               "eos_token_ids": list(trainer.eos_token_ids),
               "torch_threads": torch.get_num_threads(),
               "versions": {"trl": trl.__version__, "torch": torch.__version__,
                            "transformers": transformers.__version__}}, f)


if __name__ == "__main__":
  main()
