"""grpo_jax against TRL's GRPOTrainer on one GPU, at three real shapes, in one table.

  python benchmarks/gpu_side_by_side.py [--shapes 0.5b-256,0.5b-1024,1.5b-1024] [--steps 2]
      [--trl-python python3] [--budget 420] [--peak-tflops 989] [--hbm-tbps 4.8] [--quick]

Shapes (random weights, every completion full length, beta 0.04, bf16):
  0.5b-256   Qwen2.5-0.5B, 8 prompts x G=8, 32 + 256 tokens
  0.5b-1024  Qwen2.5-0.5B, 16 prompts x G=8, 32 + 1024 tokens (the usual reasoning shape)
  1.5b-1024  Qwen2.5-1.5B, 8 prompts x G=8, 32 + 1024 tokens

Systems: grpo_jax (`benchmarks/gpu_step.py`: the trainer's layout and memory plan) and TRL
1.x (`benchmarks/trl_driver.py`, HF generate, no vLLM) at its GPU defaults (bf16, gradient
checkpointing on) and with checkpointing off. Each run is its own process (no system holds
GPU memory while another runs), with its share of `--budget` seconds. The table: step time
split into sampling, score (old / reference log-probs, rewards) and update, completion
tokens/s, peak GPU memory, MFU (analytic model FLOPs, `plan.roofline.step_flops`, against
`--peak-tflops`), and the decode roofline next to grpo_jax's sampling time.

`--quick` is the smoke run of the script itself on any machine (1 layer, 2 prompts, 8 new
tokens; TRL on the CPU in float32 when no GPU is visible to torch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import compare  # noqa: E402  (benchmarks/compare.py: checkpoints, prompts, reward module)

from grpo_jax.models import hf, presets  # noqa: E402
from grpo_jax.plan import roofline  # noqa: E402

# name: (preset, gpu_step shape, prompts per step, completion tokens)
SHAPES = {
    "0.5b-256": ("preset:qwen2.5-0.5b", "qwen2.5-0.5b-256", 8, 256),
    "0.5b-1024": ("preset:qwen2.5-0.5b", "qwen2.5-0.5b-reasoning", 16, 1024),
    "1.5b-1024": ("preset:qwen2.5-1.5b", "qwen2.5-1.5b-reasoning", 8, 1024),
}
G, PROMPT_TOKENS, BETA = 8, 32, 0.04


def workload(shape: str, quick: bool) -> tuple[compare.Workload, object]:
  preset, _, prompts, length = SHAPES[shape]
  cfg = hf.config_from_hf(presets.hf_config(preset))
  if quick:
    cfg, prompts, length = cfg.replace(num_layers=1), 2, 8
  w = compare.Workload(cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
                       cfg.intermediate_size, cfg.vocab_size, prompts, length,
                       num_generations=G, beta=BETA, prompt_chars=PROMPT_TOKENS)
  return w, cfg


def run_process(cmd: list[str], env: dict, log_path: str, timeout_s: float) -> int:
  with open(log_path, "w") as log:
    try:
      return subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            timeout=max(timeout_s, 1)).returncode
    except subprocess.TimeoutExpired:
      log.write(f"\ngpu_side_by_side.py: stopped after {timeout_s:.0f} s\n")
      return -9


def grpo_jax_row(shape: str, args, out_dir: str, timeout_s: float) -> dict:
  name = SHAPES[shape][1]
  log = os.path.join(out_dir, f"grpo_jax_{shape}.log")
  cmd = [sys.executable, os.path.join(HERE, "gpu_step.py"), "--models", name,
         "--dtypes", "bfloat16", "--steps", str(args.steps), "--peak-tflops",
         str(args.peak_tflops), "--hbm-tbps", str(args.hbm_tbps),
         *(["--quick"] if args.quick else [])]
  code = run_process(cmd, dict(os.environ), log, timeout_s)
  with open(log) as f:
    found = [json.loads(line[len("json:"):]) for line in f if line.startswith("json:")]
  if code != 0 or not found:
    return {"system": "grpo_jax", "error": f"exit {code}; see {log}"}
  r = found[-1]
  return {"system": "grpo_jax", "step_s": r["step_s"], "sampling_s": r["sampling_s"],
          "score_s": r["score_s"], "update_s": r["update_s"],
          "decode_roofline_s": r["decode_roofline_s"], "peak_gib": r["peak_memory_gib"],
          "plan": r["memory_plan"], "attention": r["attention"]}


def trl_row(shape: str, checkpointing: bool, files: dict, w, args, out_dir: str,
            timeout_s: float) -> dict:
  system = "trl" + (" (checkpointing)" if checkpointing else " (no checkpointing)")
  tag = "ckpt" if checkpointing else "nockpt"
  out = os.path.join(out_dir, f"trl_{shape}_{tag}.json")
  log = os.path.join(out_dir, f"trl_{shape}_{tag}.log")
  gpu = not args.quick or args.trl_device == "cuda"
  cmd = [args.trl_python, os.path.join(HERE, "trl_driver.py"), "--model", files["model"],
         "--prompts", files["prompts"], "--out", out, "--workdir",
         os.path.join(out_dir, f"trl_{shape}_{tag}"),
         "--prompts-per-step", str(w.prompts_per_step), "--num-generations", str(G),
         "--max-completion-length", str(w.max_completion_length),
         "--steps", str(args.steps + 1), "--beta", str(BETA),
         "--device", "cuda" if gpu else "cpu", *(["--bf16"] if gpu else []),
         *(["--gradient-checkpointing"] if checkpointing else [])]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([files["dir"], HERE]),
             HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             WANDB_DISABLED="true", TOKENIZERS_PARALLELISM="false")
  code = run_process(cmd, env, log, timeout_s)
  if code != 0 or not os.path.exists(out):
    return {"system": system, "error": f"exit {code}; see {log}"}
  with open(out) as f:
    r = json.load(f)
  median = lambda xs: sorted(xs[1:])[len(xs[1:]) // 2] if len(xs) > 1 else xs[0]
  step, sampling = median(r["step_seconds"]), median(r["phase_seconds"]["sampling"])
  score = median(r["phase_seconds"]["score"])
  peak = r.get("peak_memory_bytes")
  return {"system": system, "step_s": step, "sampling_s": sampling, "score_s": score,
          "update_s": step - sampling - score,
          "peak_gib": None if peak is None else round(peak / 2**30, 2)}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--shapes", default=",".join(SHAPES))
  p.add_argument("--steps", type=int, default=2, help="timed steps after the first")
  p.add_argument("--trl-python", default=sys.executable)
  p.add_argument("--trl-device", default="cuda", choices=["cuda", "cpu"],
                 help="with --quick: where TRL runs (cpu on a machine without a GPU)")
  p.add_argument("--budget", type=float, default=420.0, help="seconds for all runs")
  p.add_argument("--peak-tflops", type=float, default=989.0)
  p.add_argument("--hbm-tbps", type=float, default=4.8)
  p.add_argument("--out", default="/tmp/gpu_side_by_side")
  p.add_argument("--quick", action="store_true")
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  shapes = args.shapes.split(",")
  runs_left, deadline = 3 * len(shapes), time.perf_counter() + args.budget
  print("| shape | system | step | sampling (decode roofline) | score | update | "
        "completion tok/s | peak GPU memory | MFU |")
  print("|---|---|---|---|---|---|---|---|---|")
  for shape in shapes:
    w, cfg = workload(shape, args.quick)
    files = compare.prepare_workload(w, os.path.join(args.out, shape), seed=0)
    flops = roofline.step_flops(cfg, w.prompts_per_step, G, PROMPT_TOKENS,
                                w.max_completion_length, BETA)["step"]
    tokens = w.prompts_per_step * G * w.max_completion_length
    rows = []
    for system in ("grpo_jax", "trl-ckpt", "trl"):
      share = (deadline - time.perf_counter()) / runs_left
      runs_left -= 1
      rows.append(grpo_jax_row(shape, args, args.out, share) if system == "grpo_jax" else
                  trl_row(shape, system == "trl-ckpt", files, w, args, args.out, share))
    for r in rows:
      if "error" in r:
        print(f"| {shape} | {r['system']} | failed: {r['error']} |||||||", flush=True)
        continue
      roof = f" ({r['decode_roofline_s']:.2f} s)" if "decode_roofline_s" in r else ""
      print(f"| {shape} | {r['system']} | {r['step_s']:.3f} s | {r['sampling_s']:.3f} s{roof} |"
            f" {r['score_s']:.3f} s | {r['update_s']:.3f} s | {tokens / r['step_s']:,.0f} | "
            f"{r['peak_gib']} GiB | "
            f"{100 * flops / r['step_s'] / (args.peak_tflops * 1e12):.1f}% |", flush=True)
    print("json:", json.dumps({"shape": shape, "rows": rows}), flush=True)


if __name__ == "__main__":
  main()
