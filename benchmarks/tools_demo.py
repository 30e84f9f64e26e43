"""Does the tools demo learn to call its calculator, and does the tool help?

  python benchmarks/tools_demo.py [--steps 100] [--out /tmp/grpo_tools_demo]

Trains configs/tools_demo.py (the supervised warm-up, then GRPO) in --out, timing the whole
run, then evaluates the held-out prompts greedily, before GRPO (the warmed-up model: the
reference checkpoint) and after it (the last checkpoint), each twice:
  with the tool     multi-turn: a call is run, its response prefilled, the model answers;
  without the tool  single-turn decoding: nothing answers a call, the model must write the
                    answer itself.
Prints accuracy and calls per completion for the four cases and the CPU. Not a test:
nothing here asserts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--out", default="/tmp/grpo_tools_demo")
  args = p.parse_args()

  from etils import epath  # noqa: PLC0415 (after the path setup)

  from grpo_jax import build, checkpoint, evaluate, grpo, rollouts, train  # noqa: PLC0415
  from grpo_jax import config as config_lib  # noqa: PLC0415
  from grpo_jax.tools import host as tools_host  # noqa: PLC0415
  from variants_learn import cpu_name  # noqa: PLC0415

  config = config_lib.from_file(os.path.join(ROOT, "configs", "tools_demo.py"))
  config.max_steps = args.steps
  shutil.rmtree(args.out, ignore_errors=True)
  started = time.perf_counter()
  train.train_and_evaluate(config, args.out)
  seconds = time.perf_counter() - started

  s = build.setup(config)
  ckpt = checkpoint.Checkpointer(epath.Path(args.out) / "checkpoints", build.fingerprint(s),
                                 max_to_keep=config.keep_checkpoints)
  try:
    restored = build.restore_checkpoint(config, s, ckpt)
  finally:
    ckpt.close()
  tx, schedule = build.make_optimizer(config)
  layout = build.build_layout(config, grpo.GRPOStep(s.model_def, tx, schedule, s.grpo_config))
  greedy = evaluate.greedy_config(s.grpo_config.sampling)
  evaluators = {
      "with the tool": evaluate.Evaluator(s, config, layout, tools_host.ToolSampler(
          s.tools, s.tokenizer, layout, greedy, config.max_tool_calling_iterations,
          config.tool_timeout_seconds), s.tools.schemas),
      "without the tool": evaluate.Evaluator(s, config, layout, rollouts.SingleTurnSampler(
          layout, dataclasses.replace(greedy, stop_token_ids=())), s.tools.schemas),
  }
  rows = []
  for when, params in (("before GRPO", restored.reference), ("after GRPO", restored.state.params)):
    placed = layout.place_params(params)
    for how, evaluator in evaluators.items():
      result = evaluator(placed)
      rows.append({"model": when, "eval": how, "accuracy": result.metrics["eval/accuracy"],
                   "calls_per_completion": result.metrics.get("eval/tools/calls_per_completion"),
                   "sample": result.sample_text.split("\n\n")[0]})
      print(json.dumps(rows[-1]), flush=True)
  print(f"\nCPU: {cpu_name()}, {os.cpu_count()} cores; {args.steps} GRPO steps; whole run "
        f"(warm-up + GRPO + evaluations) {seconds:.0f} s")
  print(f"{'model':12s} {'eval':17s} {'accuracy':>8s} {'calls':>6s}")
  for r in rows:
    calls = "-" if r["calls_per_completion"] is None else f"{r['calls_per_completion']:.2f}"
    print(f"{r['model']:12s} {r['eval']:17s} {100 * r['accuracy']:7.1f}% {calls:>6s}")


if __name__ == "__main__":
  main()
