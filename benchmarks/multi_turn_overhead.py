"""What multi-turn decoding costs when no tool is called: the multi-turn phases (per-row
cache slots, APPEND_WIDTH extra cache slots) against the single-turn sampler, same model,
same prompts, same tokens (no row stops early: EOS is a token the model never picks).

  python benchmarks/multi_turn_overhead.py [--hidden 256] [--layers 4] [--length 128]
      [--rows 64] [--repeats 5]

Prints the median wall time of each and their ratio, and the CPU. Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--length", type=int, default=128)
  p.add_argument("--rows", type=int, default=64)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()

  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from grpo_jax import grpo, sampling  # noqa: PLC0415
  from grpo_jax.layouts import pmap  # noqa: PLC0415
  from grpo_jax.models import ModelConfig, Transformer  # noqa: PLC0415
  from grpo_jax.tools import turns  # noqa: PLC0415
  from variants_learn import cpu_name  # noqa: PLC0415

  vocab = 512
  model = Transformer(ModelConfig(vocab_size=vocab, hidden_size=args.hidden,
                                  num_layers=args.layers, num_heads=8, num_kv_heads=4,
                                  intermediate_size=4 * args.hidden), nnx.Rngs(0))
  cfg = sampling.SamplingConfig(max_completion_length=args.length, eos_token_ids=(vocab + 1,),
                                num_generations=4)
  step = pmap.pmap_step(grpo.GRPOStep(nnx.graphdef(model), None, None,
                                          grpo.GRPOConfig(sampling=cfg, num_reward_funcs=1)),
                            jax.local_devices()[:1])
  params = step.place_params(nnx.state(model))
  prompts = np.random.default_rng(0).integers(3, vocab, (args.rows // 4, 16)).astype(np.int32)
  mask = np.ones_like(prompts)
  phases = step.turn_phases(cfg)

  def single():
    out = step.generate(params, *step.place_batch((prompts, mask)), jax.random.key(0))
    return jax.block_until_ready(out)

  def multi():
    out, _ = turns.run_turns(step, phases, params, prompts, mask, jax.random.key(0),
                             lambda waiting, eos: {}, 1, cfg)
    return jax.block_until_ready(out)

  times = {}
  for name, fn in (("single-turn", single), ("multi-turn", multi)):
    fn()  # compile
    samples = []
    for _ in range(args.repeats):
      started = time.perf_counter()
      fn()
      samples.append(time.perf_counter() - started)
    times[name] = statistics.median(samples)
  a, b = (jax.device_get(pmap.unshard(x.completion_ids)) for x in (single(), multi()))
  print(f"CPU: {cpu_name()}; {args.rows} rows x {args.length} tokens, d={args.hidden}, "
        f"{args.layers} layers; same tokens: {bool(np.array_equal(a, b))}")
  for name, seconds in times.items():
    print(f"{name:12s} {seconds:.3f} s")
  print(f"multi / single: {times['multi-turn'] / times['single-turn']:.2f}")


if __name__ == "__main__":
  main()
