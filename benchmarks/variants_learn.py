"""Does the demo learn with each GRPO variant? Held-out greedy accuracy before and after.

  python benchmarks/variants_learn.py [--variants grpo,dapo,...] [--steps 100]
      [--num-iterations 1] [--out DIR]

Runs the embedded demo (configs/default.py: the supervised warm-up, then GRPO) once per
variant, each in its own workdir under --out. The warm-up is the same for every variant
(same seed and fields), so it is built once and its cache copied into the other workdirs.
Prints, per variant, eval/accuracy at step 0 (after the warm-up) and at the last step,
the gain in points and the run's wall time. Not a test: nothing here asserts.

With num_iterations = 1 every update is on-policy (ratio exactly 1), where several variants
have the same gradient: grpo = gspo (sequence level) = sapo (its gate's slope at 1 is 1),
and dapo = cispo; --num-iterations 2 makes the later updates off-policy, where they differ.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# Each variant: the --config.FIELD overrides on top of the demo. cispo's epsilon_high is
# its eps_max (TRL clamps the ratio at epsilon_high itself; ScaleRL recommends 5.0).
VARIANTS = {
    "grpo": {"loss_type": "grpo"},
    "dapo": {"loss_type": "dapo", "epsilon_high": 0.28},
    "dr_grpo": {"loss_type": "dr_grpo", "scale_rewards": "none"},
    "cispo": {"loss_type": "cispo", "epsilon_high": 5.0},
    "sapo": {"loss_type": "sapo"},
    "gspo": {"importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4},
    # LoRA rank 8 on every projection (alpha 16: scale 2), the base frozen; adapters take a
    # larger learning rate than full fine-tuning, as usual for LoRA.
    "lora": {"lora.rank": 8, "lora.alpha": 16.0, "lora.target_modules": "all-linear",
             "learning_rate": 1e-3},
    "qlora_nf4": {"lora.rank": 8, "lora.alpha": 16.0, "lora.target_modules": "all-linear",
                  "lora.base_quantization": "nf4", "learning_rate": 1e-3},
}


def cpu_name() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
      if line.startswith("Model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def run_variant(name: str, overrides: dict, steps: int, num_iterations: int, out: str,
                warmup_from: str | None):
  from configs import default
  from grpo_jax import metrics, train

  workdir = os.path.join(out, name)
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  if warmup_from:  # the shared warm-up: same key, so the cache is used as is
    shutil.copytree(os.path.join(warmup_from, "warmup"), os.path.join(workdir, "warmup"))
  config = default.get_config()
  config.max_steps = steps
  config.num_iterations = num_iterations
  config.checkpoint_every = 0
  config.update_from_flattened_dict(overrides)  # dotted keys for nested fields (lora.rank)
  started = time.perf_counter()
  train.train_and_evaluate(config, workdir)
  seconds = time.perf_counter() - started
  evals = [r for r in metrics.read_metrics(os.path.join(workdir, "grpo_metrics"))
           if r.get("eval/accuracy") is not None]
  return {"variant": name, "overrides": overrides, "before": evals[0]["eval/accuracy"],
          "after": evals[-1]["eval/accuracy"], "best": max(r["eval/accuracy"] for r in evals),
          "seconds": seconds, "workdir": workdir}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--num-iterations", type=int, default=1,
                 help="optimizer updates per sampled batch (GRPO's mu; > 1: off-policy ratios)")
  p.add_argument("--out", default="/tmp/grpo_variants")
  a = p.parse_args()
  names = [n.strip() for n in a.variants.split(",") if n.strip()]
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    sys.exit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
  os.makedirs(a.out, exist_ok=True)
  results, first = [], None
  for name in names:
    result = run_variant(name, VARIANTS[name], a.steps, a.num_iterations, a.out, first)
    first = first or result["workdir"]
    results.append(result)
    print(json.dumps(result), flush=True)
  print(f"\nCPU: {cpu_name()}, {os.cpu_count()} cores; {a.steps} GRPO steps per variant, "
        f"num_iterations={a.num_iterations}")
  print(f"{'variant':10} {'before':>7} {'after':>7} {'gain':>7} {'best':>7} {'seconds':>8}")
  for r in results:
    print(f"{r['variant']:10} {100 * r['before']:6.1f}% {100 * r['after']:6.1f}% "
          f"{100 * (r['after'] - r['before']):+6.1f} {100 * r['best']:6.1f}% {r['seconds']:8.1f}")
  with open(os.path.join(a.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
