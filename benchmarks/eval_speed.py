"""Seconds of one held-out greedy evaluation of a recipe, per evaluation batch size.

  python benchmarks/eval_speed.py [--config configs/smollm2_arithmetic.py] [--eval-size 512]
      [--batches 0,32,128] [--repeats 1]

Builds the recipe's model, data and reward functions as the trainer does (`build.setup`),
then times the trainer's `Evaluator` (compilation excluded: one warm-up evaluation per batch
size first) and prints the accuracy each batch size gives, which must not change.
"""

from __future__ import annotations

import argparse
import os
import time

import jax

from grpo_jax import config as config_lib
from grpo_jax import build, evaluate, grpo, rollouts

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", default=os.path.join(os.path.dirname(HERE), "configs",
                                                  "smollm2_arithmetic.py"))
  p.add_argument("--eval-size", type=int, default=512)
  p.add_argument("--batches", default="0,32")
  p.add_argument("--repeats", type=int, default=1)
  a = p.parse_args()
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}")
  print("| eval_batch_size | problems | memory plan | seconds (compiled) | first (compiles) | "
        "accuracy | mean length |")
  print("|---|---|---|---|---|---|---|")
  for batch in map(int, a.batches.split(",")):
    config = config_lib.from_file(a.config)
    config.eval_size, config.eval_batch_size = a.eval_size, batch
    s = build.setup(config)
    tx, schedule = build.make_optimizer(config)
    layout = build.planned_layout(
        config, grpo.GRPOStep(s.model_def, tx, schedule, s.grpo_config,
                              reference_def=s.reference_def), s.model_config)
    params = layout.place_params(s.init_params)
    layout.note_resident(layout.init_state(params), None)
    sampler = rollouts.SingleTurnSampler(layout, evaluate.greedy_config(s.grpo_config.sampling))
    evaluator = evaluate.Evaluator(s, config, layout, sampler)
    started = time.perf_counter()
    result = evaluator(params)
    first = time.perf_counter() - started
    times = [] if a.repeats else [first]  # --repeats 0: the first one (compilation included)
    for _ in range(a.repeats):
      started = time.perf_counter()
      result = evaluator(params)
      times.append(time.perf_counter() - started)
    plan = "; ".join(setting.describe(evaluator.batch_size, name) for name, (setting, _)
                     in layout.choices.items() if name == "evaluator")
    print(f"| {batch or 'all'} | {a.eval_size} | {plan} | {min(times):.1f} s | {first:.1f} s | "
          f"{result.metrics['eval/accuracy']:.4f} | "
          f"{result.metrics['eval/completions/mean_length']:.1f} |", flush=True)


if __name__ == "__main__":
  main()
