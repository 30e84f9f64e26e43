"""Where one grpo_jax GRPO step goes, phase by phase, on one compare.py workload.

  python benchmarks/profile_step.py --workload small [--steps 4] [--out /tmp/grpo_profile]

Builds the workload's checkpoint and prompts exactly as compare.py does, then runs the
train loop's pieces one at a time, waiting for each to finish:

  compile   XLA compilation of the sampler and of the update (first call of each)
  sampling  prompts -> completions (prefill + KV-cached decode), on the device
  rewards   completions decoded to text and scored by the reward functions, on the host
  reference the reference model's log-probs (one forward pass; skipped when beta = 0)
  train     the policy's forward + backward over micro-batches, and the AdamW update

`reference` and `train` are timed as separate jitted programs; in the train loop they run
fused in one (`GRPOStep.learn`), so their sum can differ slightly from `time/update`.
Prints the median over the steady steps and each phase's share, with model GFLOP/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import compare  # benchmarks/compare.py: the workloads and their files


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workload", default="small", choices=list(compare.WORKLOADS))
  p.add_argument("--steps", type=int, default=4, help="steps after the compiling one")
  p.add_argument("--out", default="/tmp/grpo_profile")
  a = p.parse_args()

  import jax

  from grpo_jax import config as config_lib
  from grpo_jax import build, grpo, rollouts
  from grpo_jax.data import batching

  w = compare.WORKLOADS[a.workload]
  files = compare.prepare_workload(w, os.path.join(a.out, a.workload), seed=0, rebuild=False)
  prompt_tokens = files["prompt_tokens"]
  sys.path.insert(0, files["dir"])  # bench_reward

  config = config_lib.base_config()
  config.update(compare.grpo_jax_settings(w, files, steps=100, learning_rate=1e-6, seed=0))
  s = build.setup(config)
  tx, schedule = grpo.make_optimizer(1e-6, 100, schedule="constant")
  step = grpo.GRPOStep(s.model_def, tx, schedule, s.grpo_config)
  host = rollouts.HostRollouts(s.tokenizer, s.reward_funcs, config, config.num_generations)
  stream = batching.PromptStream(s.train_data, config.prompts_per_step, seed=0)
  params = jax.device_put(s.init_params)
  reference = jax.device_put(s.init_params)
  state = grpo.init_train_state(params, tx)
  cfg = s.grpo_config

  generate = jax.jit(step.generate)

  @jax.jit
  def reference_pass(ref_params, rollout):
    return grpo.completion_logprobs(s.model_def, ref_params, rollout, cfg.temperature,
                                    cfg.logprob_chunk_size)[0]

  @jax.jit
  def train_pass(state, scored):
    return grpo.update(state, scored, s.model_def, tx, schedule, cfg)

  times: dict[str, list[float]] = {}
  for i in range(a.steps + 1):
    rows = stream.next_batch()
    ids, mask = host.encode(rows)
    t0 = time.perf_counter()
    rollout = jax.block_until_ready(generate(state.params, ids, mask, jax.random.key(i)))
    t1 = time.perf_counter()
    rewards, _ = host.score(rows, jax.device_get(rollout))
    t2 = time.perf_counter()
    ref = jax.block_until_ready(reference_pass(reference, rollout)) if cfg.beta else None
    t3 = time.perf_counter()
    adv = grpo.group_advantages(rewards, cfg.weights, cfg.num_generations, cfg.scale_rewards)
    scored = grpo.ScoredRollout(rollout, adv.advantages, None, ref)
    state, _ = jax.block_until_ready(train_pass(state, scored))
    t4 = time.perf_counter()
    for name, seconds in (("sampling", t1 - t0), ("rewards", t2 - t1), ("reference", t3 - t2),
                          ("train", t4 - t3)):
      times.setdefault(name, []).append(seconds)

  flops = compare.model_flops(w, prompt_tokens)
  steady = {k: statistics.median(v[1:]) for k, v in times.items()}
  total = sum(steady.values())
  first = sum(v[0] for v in times.values())
  print(f"{a.workload}: first step {first:.2f} s (compilation {first - total:.2f} s), "
        f"steady step {total:.3f} s")
  for name, seconds in steady.items():
    gflop = flops.get(name, 0) / 1e9
    rate = f", {gflop / seconds:,.0f} model GFLOP/s" if gflop else ""
    print(f"  {name:10s} {seconds:8.3f} s  {seconds / total:5.0%}{rate}")


if __name__ == "__main__":
  main()
