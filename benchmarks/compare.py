"""Side-by-side GRPO step time and memory: grpo_jax against TRL and Tunix, on CPU.

  python benchmarks/compare.py --workloads small,tiny [--systems grpo_jax,trl,tunix] \
      [--steps 6]

For each workload this builds one local Hugging Face checkpoint (transformers, random
weights, fixed seed, float32) with a small tokenizer in the same directory and a JSONL
prompt file, then runs the same GRPO workload through each system, one after another, each
in its own subprocess and virtual environment (grpo_jax: the project's venv; TRL's
GRPOTrainer and Tunix's GRPOLearner: the venvs made by benchmarks/setup_peers.sh). It prints
one markdown table: first step (compilation included), median steady step (steps 2..N), peak
RSS of the subprocess (/usr/bin/time -v), and grpo_jax / peer ratios.

Every completion is forced to full length in every system: the tokenizer's EOS (and
generation_config.json's eos_token_id) is id V, one past the model's vocabulary of V
logits, so no sampler can ever produce it. The script checks the logged
`completions/mean_length` of every step against max_completion_length.

The `smollm2` workload is the exception (benchmarks/smollm2_workload.py): the real
SmolLM2-135M-Instruct, chat-formatted word problems, a correctness reward and natural EOS,
batched as configs/smollm2_arithmetic.py. Its completions end where each system's samples
end, so it gets a table of its own: mean completion length, completion tokens/s, and MFU
from each system's model FLOPs at its own completion lengths.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

import smollm2_workload  # benchmarks/smollm2_workload.py, beside this script
from compare_report import fmt_mib, table  # benchmarks/compare_report.py: the tables
from grpo_jax.models import ModelConfig
from grpo_jax.plan import roofline

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NEVER_EOS = "<|never|>"  # the EOS token: id = model vocab size, outside what the model samples
SYSTEMS = ("grpo_jax", "trl", "tunix")


@dataclasses.dataclass(frozen=True)
class Workload:
  """A model shape (Qwen2 layout, tied embeddings) and a GRPO batch.

  model "random": a random-weight Qwen2 of this shape whose EOS no sampler produces (every
  completion full length); "smollm2": SmolLM2-135M-Instruct (a Llama of this shape) with its
  own EOS (natural_eos), built by benchmarks/smollm2_workload.py.
  """

  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  vocab_size: int
  prompts_per_step: int
  max_completion_length: int
  num_generations: int = 8
  beta: float = 0.04
  prompt_chars: int = 32  # 0: the demo's arithmetic prompts ("3+4-2=")
  timeout_s: int = 1200  # per system run
  model: str = "random"
  natural_eos: bool = False  # completions end at the model's EOS, not at full length
  max_prompt_length: int = 0  # 0: the prompts' one length (no padding)
  temperature: float = 1.0
  loss_type: str = "grpo"  # grpo or dapo (TRL's names; Tunix: its loss_agg_mode for each)
  reward: str = "length_mod7"  # the function of bench_reward.py
  train_length_bucket: int = 64  # grpo_jax's (its default; irrelevant at full length)
  tunix_pad_token: str | None = None  # tunix_driver.py's --pad-token


WORKLOADS = {
    # The embedded demo's model and batch (configs/default.py), demo char tokenizer (98 tokens).
    "tiny": Workload(64, 2, 4, 2, 256, 98, prompts_per_step=16, max_completion_length=24,
                     prompt_chars=0, timeout_s=600),
    "small": Workload(512, 4, 8, 4, 1408, 4096, prompts_per_step=4, max_completion_length=64),
    "long": Workload(512, 4, 8, 4, 1408, 4096, prompts_per_step=2, max_completion_length=512,
                     timeout_s=3600),
    "big-vocab": Workload(256, 2, 4, 2, 704, 151936, prompts_per_step=4,
                          max_completion_length=128, timeout_s=3600),
    # configs/smollm2_arithmetic.py's batch and loss (checked against it when built), the
    # prompts left-padded to 80 positions, as the recipe (they have 60-79 tokens).
    "smollm2": Workload(576, 30, 9, 3, 1536, 49152, prompts_per_step=4,
                        max_completion_length=128, beta=0.0, timeout_s=3600, model="smollm2",
                        natural_eos=True, max_prompt_length=smollm2_workload.MAX_PROMPT_LENGTH,
                        temperature=0.7, loss_type="dapo", train_length_bucket=32,
                        reward=smollm2_workload.REWARD_FUNCTION,
                        tunix_pad_token=smollm2_workload.TUNIX_PAD_TOKEN),
}

def model_config(w: Workload) -> ModelConfig:
  """grpo_jax's config of the workload's model shape (tied embeddings, head dim D / heads)."""
  return ModelConfig(vocab_size=w.vocab_size, hidden_size=w.hidden_size,
                     num_layers=w.num_layers, num_heads=w.num_heads,
                     num_kv_heads=w.num_kv_heads, intermediate_size=w.intermediate_size)


def model_flops(w: Workload, prompt_tokens: float,
                completion_tokens: float | None = None) -> dict[str, float]:
  """Model FLOPs of one GRPO step (`grpo_jax.plan.roofline`), the same for every system at
  full length; with natural EOS, at a system's mean prompt and completion lengths (rounded)."""
  length = w.max_completion_length if completion_tokens is None else completion_tokens
  return roofline.step_flops(model_config(w), w.prompts_per_step, w.num_generations,
                             round(prompt_tokens), max(1, round(length)), w.beta)


def matmul_throughput(python: str, backend: str) -> float | None:
  """GFLOP/s of a 2048^3 float32 matmul (benchmarks/matmul_peak.py), or None if it failed."""
  try:
    out = subprocess.run([python, os.path.join(HERE, "matmul_peak.py"), backend],
                         capture_output=True, text=True, timeout=300, env=clean_env(""),
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["gflops"]
  except (OSError, subprocess.SubprocessError, ValueError, KeyError, IndexError):
    return None


REWARD_MODULE = '''"""The benchmark's reward: cheap, deterministic, identical in every system."""


def length_mod7(prompts, completions, **kwargs):
  return [float(len(c) % 7) for c in completions]
'''


# --- the workload's files ------------------------------------------------------------------

def build_tokenizer(model_vocab: int):
  """The demo's char tokenizer, padded with filler tokens to `model_vocab`, EOS at id V.

  Ids 0..97 are the demo tokenizer's (<pad> <eos> <unk> and printable ASCII), so prompts
  tokenize to one id per character in every system; the demo's "<eos>" (id 1) becomes an
  ordinary token, and the real EOS is NEVER_EOS at id `model_vocab`.
  """
  import tokenizers
  import transformers
  from tokenizers import decoders, models, pre_tokenizers

  from grpo_jax.data import demo

  base = demo.build_demo_tokenizer()
  vocab = dict(base.get_vocab())
  if model_vocab < len(vocab):
    raise ValueError(f"model vocab {model_vocab} < the demo tokenizer's {len(vocab)} tokens")
  for i in range(len(vocab), model_vocab):
    vocab[f"<t{i}>"] = i
  vocab[NEVER_EOS] = model_vocab
  backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
  backend.decoder = decoders.Fuse()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, pad_token="<pad>", eos_token=NEVER_EOS, unk_token="<unk>",
      padding_side="left", clean_up_tokenization_spaces=False)


def build_checkpoint(w: Workload, path: str, seed: int = 0) -> None:
  """A random-weight Qwen2 checkpoint (float32) with its tokenizer, in `path`."""
  import torch
  import transformers

  tokenizer = build_tokenizer(w.vocab_size)
  eos_id = tokenizer.eos_token_id
  assert eos_id == w.vocab_size, (eos_id, w.vocab_size)
  config = transformers.Qwen2Config(
      vocab_size=w.vocab_size, hidden_size=w.hidden_size, num_hidden_layers=w.num_layers,
      num_attention_heads=w.num_heads, num_key_value_heads=w.num_kv_heads,
      intermediate_size=w.intermediate_size, tie_word_embeddings=True,
      max_position_embeddings=2048, rms_norm_eps=1e-6, use_sliding_window=False,
      bos_token_id=None, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id,
      dtype="float32")
  torch.manual_seed(seed)
  model = transformers.Qwen2ForCausalLM(config).to(torch.float32)
  model.generation_config = transformers.GenerationConfig(
      eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
      do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
  model.save_pretrained(path)
  tokenizer.save_pretrained(path)


def write_prompts(w: Workload, path: str, count: int = 128, seed: int = 0) -> int:
  """A JSONL prompt file; returns the prompt length in tokens (all prompts have it)."""
  import random

  from grpo_jax.data import demo

  rng = random.Random(seed)
  if w.prompt_chars == 0:
    prompts = rng.sample(demo.all_prompts(), count)
  else:
    letters = "abcdefghijklmnopqrstuvwxyz "
    prompts = [f"Q{i:03d}: " + "".join(rng.choice(letters) for _ in range(w.prompt_chars - 6))
               for i in range(count)]
  lengths = {len(p) for p in prompts}
  assert len(lengths) == 1, lengths  # one char = one token: no prompt padding anywhere
  with open(path, "w") as f:
    f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
  return lengths.pop()


# --- running one system ----------------------------------------------------------------------

@dataclasses.dataclass
class Result:
  workload: str
  system: str
  ok: bool
  step_seconds: list[float] = dataclasses.field(default_factory=list)
  mean_lengths: list[float] = dataclasses.field(default_factory=list)
  peak_rss_kib: int | None = None
  wall_seconds: float = 0.0
  error: str = ""
  info: dict = dataclasses.field(default_factory=dict)

  warmup_steps: int = 1

  @property
  def first_step(self) -> float | None:
    return self.step_seconds[0] if self.step_seconds else None

  @property
  def second_step(self) -> float | None:
    return self.step_seconds[1] if len(self.step_seconds) > 1 else None

  @property
  def steady_steps(self) -> list[float]:
    return self.step_seconds[self.warmup_steps:]

  @property
  def steady_step(self) -> float | None:
    return statistics.median(self.steady_steps) if self.steady_steps else None


def clean_env(extra_pythonpath: str) -> dict[str, str]:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # grpo_jax on exactly one CPU device, no fake devices
  env.pop("VIRTUAL_ENV", None)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = extra_pythonpath
  env["TOKENIZERS_PARALLELISM"] = "false"
  env["HF_HUB_OFFLINE"] = "1"
  env["HF_DATASETS_OFFLINE"] = "1"
  env["TRANSFORMERS_OFFLINE"] = "1"
  env["WANDB_DISABLED"] = "true"
  return env


def busy_cpu_seconds() -> float | None:
  """CPU seconds the whole machine has spent busy since boot (/proc/stat), or None."""
  try:
    with open("/proc/stat") as f:
      fields = [int(x) for x in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # up to steal, no guest double count


def others_cpu(log_path: str, busy_before: float | None, busy_after: float | None,
               wall: float) -> float | None:
  """Cores' worth of CPU that other processes used during the run (0 = a quiet machine)."""
  with open(log_path) as f:
    text = f.read()
  user = re.findall(r"User time \(seconds\): ([\d.]+)", text)
  system = re.findall(r"System time \(seconds\): ([\d.]+)", text)
  if busy_before is None or busy_after is None or not user or not system or wall <= 0:
    return None
  own = float(user[-1]) + float(system[-1])
  return max(0.0, (busy_after - busy_before - own) / wall)


def run_timed(cmd: list[str], env: dict, log_path: str, timeout_s: int
              ) -> tuple[int, int | None, float]:
  """(exit code, peak RSS in KiB from /usr/bin/time -v, wall seconds); output to log_path.

  /usr/bin/time's report (peak RSS, CPU share) is read back from the end of the log.
  """
  started = time.perf_counter()
  with open(log_path, "w") as log:
    # Its own session, so that a timeout ends the trainer too, not only /usr/bin/time.
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
      code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      code = -9
      log.write(f"\ncompare.py: killed after the {timeout_s} s timeout\n")
  wall = time.perf_counter() - started
  with open(log_path) as log:
    found = re.findall(r"Maximum resident set size \(kbytes\): (\d+)", log.read())
  return code, (int(found[-1]) if found else None), wall


def cpu_percent(log_path: str) -> str:
  """/usr/bin/time's "Percent of CPU this job got" (200% = both cores of a 2-core machine)."""
  with open(log_path) as f:
    found = re.findall(r"Percent of CPU this job got: (\S+)", f.read())
  return found[-1] if found else "?"


def tail(path: str, lines: int = 15) -> str:
  with open(path) as f:
    return "".join(f.readlines()[-lines:])


def prepare_workload(w: Workload, wdir: str, seed: int, rebuild: bool = True,
                     count: int = 128) -> dict:
  """The workload's files in `wdir`: checkpoint, prompts and the reward module.

  Returns {"dir", "model", "prompts", "prompt_tokens"} (smollm2: the mean prompt length,
  and "prompt_lengths"). rebuild=False keeps an existing checkpoint (the same seed builds
  the same weights). count: prompts to write (smollm2's; the others write 128).
  """
  if w.model == "smollm2":
    smollm2_workload.check_against_recipe(
        prompts_per_step=w.prompts_per_step, num_generations=w.num_generations,
        max_completion_length=w.max_completion_length, temperature=w.temperature,
        beta=w.beta, loss_type=w.loss_type)
    files = smollm2_workload.prepare(wdir, count, seed, w.max_prompt_length, w.temperature,
                                     rebuild)
    # The model FLOPs count the workload's shape: it must be the checkpoint's.
    built, shape = smollm2_workload.model_config(files["model"]), model_config(w)
    fields = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
              "intermediate_size", "head_dim", "tie_word_embeddings", "qkv_bias", "qk_norm")
    differ = [f for f in fields if getattr(built, f) != getattr(shape, f)]
    if differ:
      raise ValueError(f"the smollm2 checkpoint differs from the workload's shape in {differ}")
    return files
  os.makedirs(wdir, exist_ok=True)
  files = {"dir": wdir, "model": os.path.join(wdir, "model"),
           "prompts": os.path.join(wdir, "prompts.jsonl")}
  if rebuild or not os.path.exists(os.path.join(files["model"], "config.json")):
    build_checkpoint(w, files["model"], seed=seed)
  files["prompt_tokens"] = write_prompts(w, files["prompts"], seed=seed)
  with open(os.path.join(wdir, "bench_reward.py"), "w") as f:
    f.write(REWARD_MODULE)
  return files


def grpo_jax_settings(w: Workload, files: dict, steps: int, learning_rate: float,
                      seed: int) -> dict:
  """grpo_jax config fields that run the workload as the peers run it.

  The prompts are plain text (smollm2's already rendered with the chat template), so no
  template is applied. train_length_bucket: smollm2's is its recipe's.
  """
  return {
      "model_path": files["model"], "dataset": f"json:{files['prompts']}",
      "prompt_column": "prompt", "reward_funcs": f"bench_reward:{w.reward}",
      "sft_steps": 0, "eval_size": 0, "chat_template": "none",
      "prompts_per_step": w.prompts_per_step, "num_generations": w.num_generations,
      "max_prompt_length": w.max_prompt_length or files["prompt_tokens"],
      "max_completion_length": w.max_completion_length,
      "train_length_bucket": w.train_length_bucket,
      "temperature": w.temperature, "top_k": 0, "top_p": 1.0,
      "beta": w.beta, "epsilon": 0.2, "loss_type": w.loss_type, "scale_rewards": "group",
      "num_iterations": 1, "dtype": "float32", "remat": False,
      "learning_rate": learning_rate, "lr_scheduler_type": "constant",
      "max_grad_norm": 1.0, "weight_decay": 0.0,
      "max_steps": steps, "log_every": 1, "eval_every": steps,
      "checkpoint_every": steps, "seed": seed,
  }


def run_grpo_jax(name: str, w: Workload, files: dict, args) -> Result:
  workdir = os.path.join(files["dir"], "grpo_jax_workdir")
  shutil.rmtree(workdir, ignore_errors=True)  # a leftover workdir would resume, not rerun
  cfg = grpo_jax_settings(w, files, args.steps, args.learning_rate, args.seed)
  cmd = [args.grpo_jax_python, "-m", "grpo_jax.train", f"--workdir={workdir}",
         *[f"--config.{k}={v}" for k, v in cfg.items()]]
  log_path = os.path.join(files["dir"], "grpo_jax.log")
  code, rss, wall = run_timed(cmd, clean_env(files["dir"]), log_path, w.timeout_s)
  result = Result(name, "grpo_jax", ok=code == 0, peak_rss_kib=rss, wall_seconds=wall)
  metrics_path = os.path.join(workdir, "grpo_metrics", "metrics.jsonl")
  if code != 0 or not os.path.exists(metrics_path):
    result.ok, result.error = False, f"exit {code}; log {log_path}:\n{tail(log_path)}"
    return result
  records: dict[int, dict] = {}
  with open(metrics_path) as f:
    for line in f:
      rec = json.loads(line)
      records.setdefault(rec["step"], {}).update(rec)
  steps = [records[s] for s in sorted(records) if "step_time" in records[s]]
  result.step_seconds = [r["step_time"] for r in steps]
  result.mean_lengths = [r.get("completions/mean_length") for r in steps]
  result.info["memory_plan"] = memory_plan_lines(log_path)
  return result


def memory_plan_lines(log_path: str) -> list[str]:
  """What grpo_jax's memory plan chose (its `memory: ...` log lines), in order."""
  with open(log_path, errors="replace") as f:
    return [line.split("] memory: ", 1)[1].strip() for line in f if "] memory: " in line]


def run_peer(system: str, python: str, name: str, w: Workload, files: dict, args,
             extra: list[str]) -> tuple[Result, dict | None]:
  """Runs benchmarks/<system>_driver.py on the workload in the peer's venv.

  Returns the Result (failed unless the driver exited 0 and wrote its JSON) and that JSON.
  """
  out = os.path.join(files["dir"], f"{system}_result.json")
  if os.path.exists(out):  # a stale result must not pass for this run's
    os.remove(out)
  cmd = [python, os.path.join(HERE, f"{system}_driver.py"), "--model", files["model"],
         "--prompts", files["prompts"], "--out", out, *extra,
         "--prompts-per-step", str(w.prompts_per_step),
         "--num-generations", str(w.num_generations),
         "--max-completion-length", str(w.max_completion_length),
         "--max-prompt-length", str(w.max_prompt_length), "--steps", str(args.steps),
         "--beta", str(w.beta), "--loss-type", w.loss_type,
         "--temperature", str(w.temperature), "--reward", w.reward,
         "--learning-rate", str(args.learning_rate), "--seed", str(args.seed)]
  log_path = os.path.join(files["dir"], f"{system}.log")
  code, rss, wall = run_timed(cmd, clean_env(files["dir"]), log_path, w.timeout_s)
  result = Result(name, system, ok=code == 0, peak_rss_kib=rss, wall_seconds=wall)
  if code != 0 or not os.path.exists(out):
    result.ok, result.error = False, f"exit {code}; log {log_path}:\n{tail(log_path)}"
    return result, None
  with open(out) as f:
    data = json.load(f)
  result.step_seconds = data["step_seconds"]
  return result, data


def run_trl(name: str, w: Workload, files: dict, args) -> Result:
  workdir = os.path.join(files["dir"], "trl_workdir")
  shutil.rmtree(workdir, ignore_errors=True)
  result, data = run_peer("trl", args.trl_python, name, w, files, args, ["--workdir", workdir])
  if data is None:
    return result
  by_step: dict[int, dict] = {}
  for rec in data["logs"]:
    by_step.setdefault(rec["step"], {}).update(rec)
  result.mean_lengths = [by_step[s].get("completions/mean_length") for s in sorted(by_step)
                         if "completions/mean_length" in by_step[s]]
  result.info = {"versions": data["versions"], "torch_threads": data["torch_threads"],
                 "eos_token_ids": data["eos_token_ids"]}
  return result


def run_tunix(name: str, w: Workload, files: dict, args) -> Result:
  extra = ["--pad-token", w.tunix_pad_token] if w.tunix_pad_token else []
  result, data = run_peer("tunix", args.tunix_python, name, w, files, args, extra)
  if data is None:
    return result
  result.mean_lengths = data["mean_lengths"]  # Tunix's logged completions/mean_length
  # Per-phase seconds (rollout, reference, actor_update) from Tunix's own perf tracer; the
  # median over the steady steps, like the step time.
  steady = data["phase_seconds"][args.warmup_steps:]
  phases = {}
  for phase in steady[0] if steady else {}:
    values = [step[phase] for step in steady]
    if None not in values:
      phases[phase] = round(statistics.median(values), 4)
  result.info = {"versions": data["versions"], "eos_token_ids": data["eos_token_ids"],
                 "pad_token_id": data["pad_token_id"], "kv_cache_size": data["kv_cache_size"],
                 "model_family": data["model_family"], "loss_agg_mode": data["loss_agg_mode"],
                 "prompt_lengths": data["prompt_lengths"],
                 "steady_phase_seconds": phases, "phase_seconds": data["phase_seconds"]}
  return result


RUNNERS = {"grpo_jax": run_grpo_jax, "trl": run_trl, "tunix": run_tunix}


def check_lengths(result: Result, w: Workload) -> None:
  """Marks the run failed unless every step logged its completions' mean length, and that
  is exactly L (full length), or with natural EOS in (0, L]."""
  if not result.ok:
    return
  if len(result.step_seconds) != len(result.mean_lengths) or not result.mean_lengths:
    result.ok = False
    result.error = (f"{len(result.step_seconds)} step times but {len(result.mean_lengths)} "
                    "logged completion lengths")
    return
  limit = w.max_completion_length
  wrong = [m for m in result.mean_lengths if m is None or (
      not 0 < m <= limit + 1e-6 if w.natural_eos else abs(m - limit) > 1e-6)]
  if wrong:
    result.ok = False
    expected = f"between 0 and {limit}" if w.natural_eos else f"{limit}"
    result.error = f"mean completion lengths {result.mean_lengths}, expected {expected}"


def natural_eos_measures(result: Result, w: Workload, prompt_tokens: float) -> None:
  """Adds to result.info what the natural-EOS table shows, over the steady steps: the mean
  completion length, completion tokens/s, and model FLOPs (each step's at that step's mean
  completion length and the prompts' mean length)."""
  if not (result.ok and result.steady_steps):
    return
  lengths = result.mean_lengths[result.warmup_steps:]
  seconds = sum(result.steady_steps)
  flops = sum(model_flops(w, prompt_tokens, m)["step"] for m in lengths)
  rows = w.prompts_per_step * w.num_generations
  result.info.update(mean_completion_length=round(statistics.mean(lengths), 1),
                     completion_tokens_per_s=rows * sum(lengths) / seconds,
                     step_gflop=flops / len(lengths) / 1e9, model_flop_per_s=flops / seconds)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workloads", default="tiny,small",
                 help=f"comma-separated, from: {', '.join(WORKLOADS)}")
  p.add_argument("--systems", default=",".join(SYSTEMS),
                 help=f"comma-separated, from: {', '.join(SYSTEMS)}")
  p.add_argument("--steps", type=int, default=6,
                 help="optimizer steps per run (the first is the warm-up; >= 6 recommended)")
  p.add_argument("--warmup-steps", type=int, default=1,
                 help="leading steps left out of the steady median (compilation, caches)")
  p.add_argument("--learning-rate", type=float, default=1e-6)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="/tmp/grpo_compare",
                 help="checkpoints, prompt files, logs and results.json go here")
  p.add_argument("--grpo-jax-python", default=sys.executable,
                 help="interpreter with grpo_jax installed (default: this one)")
  p.add_argument("--trl-python", default="/work/bench-trl/bin/python",
                 help="interpreter of the TRL venv (benchmarks/setup_peers.sh trl)")
  p.add_argument("--tunix-python", default="/work/bench-tunix/bin/python",
                 help="interpreter of the Tunix venv (benchmarks/setup_peers.sh tunix)")
  args = p.parse_args(argv)
  workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
  systems = [s.strip() for s in args.systems.split(",") if s.strip()]
  for w in workloads:
    if w not in WORKLOADS:
      p.error(f"unknown workload {w!r}; known: {', '.join(WORKLOADS)}")
  for s in systems:
    if s not in RUNNERS:
      p.error(f"unknown system {s!r}; known: {', '.join(RUNNERS)}")
  if not 0 <= args.warmup_steps < args.steps:
    p.error("need 0 <= --warmup-steps < --steps (warm-up steps, then steady steps)")
  if "trl" in systems and not os.path.exists(args.trl_python):
    p.error(f"{args.trl_python} not found; run benchmarks/setup_peers.sh trl")
  if "tunix" in systems and not os.path.exists(args.tunix_python):
    p.error(f"{args.tunix_python} not found; run benchmarks/setup_peers.sh tunix")

  os.makedirs(args.out, exist_ok=True)
  # The yardstick of the MFU column: the best float32 matmul rate either library reaches.
  throughput = {"jax": matmul_throughput(args.grpo_jax_python, "jax")}
  if "trl" in systems:
    throughput["torch"] = matmul_throughput(args.trl_python, "torch")
  known = [g for g in throughput.values() if g]
  peak_gflops = max(known) if known else None
  print(f"float32 matmul throughput (GFLOP/s): "
        f"{ {k: None if v is None else round(v) for k, v in throughput.items()} }", flush=True)
  results: list[Result] = []
  flops: dict[str, dict] = {}
  prompt_lengths: dict[str, tuple] = {}  # natural-EOS workloads': (min, mean, max) tokens
  for name in workloads:
    w = WORKLOADS[name]
    wdir = os.path.join(args.out, name)
    print(f"[{name}] building checkpoint and prompts in {wdir}", flush=True)
    # smollm2: one problem per prompt slot of the run, so every system trains on all of them.
    files = prepare_workload(w, wdir, args.seed, count=args.steps * w.prompts_per_step)
    if w.natural_eos:  # each system's FLOPs, from its own completion lengths
      prompt_lengths[name] = files["prompt_lengths"]
    else:
      flops[name] = model_flops(w, files["prompt_tokens"])
    for system in systems:
      print(f"[{name}] running {system} ({args.steps} steps, timeout {w.timeout_s} s)",
            flush=True)
      busy_before = busy_cpu_seconds()
      result = RUNNERS[system](name, w, files, args)
      busy_after = busy_cpu_seconds()
      result.warmup_steps = args.warmup_steps
      log_path = os.path.join(wdir, f"{system}.log")
      others = others_cpu(log_path, busy_before, busy_after, result.wall_seconds)
      result.info.update(cpu_percent=cpu_percent(log_path),
                         others_cores=None if others is None else round(others, 2))
      check_lengths(result, w)
      if w.natural_eos:
        natural_eos_measures(result, w, files["prompt_tokens"])
      results.append(result)
      status = "ok" if result.ok else f"FAILED: {result.error}"
      print(f"[{name}] {system}: steps {[round(s, 3) for s in result.step_seconds]}, "
            f"mean lengths {result.mean_lengths}, peak RSS {fmt_mib(result.peak_rss_kib)}, "
            f"its CPU {result.info['cpu_percent']}, other processes' CPU "
            f"{result.info['others_cores']} cores, {status}", flush=True)
      if result.info.get("steady_phase_seconds"):
        print(f"[{name}] {system}: median steady phases (its own timers) "
              f"{result.info['steady_phase_seconds']}", flush=True)
      if (result.info["others_cores"] or 0) > 0.15:
        print(f"[{name}] warning: the machine was not quiet during {system}'s run "
              f"(others used {result.info['others_cores']} cores); its times are suspect",
              flush=True)

  shown = {n: WORKLOADS[n] for n in workloads}
  report = table(results, shown, flops, peak_gflops, prompt_lengths)
  machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"
  print(f"\n{time.strftime('%Y-%m-%d')} on {machine}\n")
  print(report)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine,
               "steps": args.steps, "results": [dataclasses.asdict(r) for r in results],
               "matmul_gflops": throughput, "model_flops": flops,
               "table": report}, f, indent=1)
  return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
