"""grpo_jax's GRPO step on whatever accelerator JAX finds: step time, completion tokens per
second, peak device memory and MFU, for random models (no weights are downloaded).

  python benchmarks/gpu_step.py [--models small,long,big-vocab,qwen2.5-0.5b]
      [--dtypes bfloat16,float32] [--steps 4] [--peak-tflops 989] [--hbm-tbps 4.8] [--quick]

Every completion runs to full length (the EOS id is outside what the model samples), as in
benchmarks/compare.py. One step is sample -> (random) rewards -> reference pass -> update,
the three programs the trainer runs; the first step (compilation) is reported apart.
MFU: the analytic model FLOPs (`grpo_jax.plan.roofline.step_flops`) per second against
`--peak-tflops` (H200 / H100 SXM dense bf16: 989; float32 runs are compared with it too);
`update MFU` is the train pass's FLOPs over the update program's time. Each phase is timed
on its own (sampling, score: old and reference log-probs, update), and the sampling time is
printed next to the decode roofline: the weights and KV cache each decoded token reads,
at `--hbm-tbps` (H200: 4.8 TB/s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np
from flax import nnx

from grpo_jax import grpo, sampling
from grpo_jax.layouts import planned, pmap
from grpo_jax.models import ModelConfig, Transformer, attention, hf, presets
from grpo_jax.plan import abstract, roofline

# (model, prompts per step, G, prompt tokens, completion tokens)
SHAPES = {
    "small": (ModelConfig(vocab_size=4096, hidden_size=512, num_layers=4, num_heads=8,
                          num_kv_heads=4, intermediate_size=1408, qkv_bias=True), 8, 8, 32, 64),
    "long": (ModelConfig(vocab_size=4096, hidden_size=512, num_layers=4, num_heads=8,
                         num_kv_heads=4, intermediate_size=1408, qkv_bias=True), 8, 8, 32, 512),
    "big-vocab": (ModelConfig(vocab_size=151936, hidden_size=512, num_layers=4, num_heads=8,
                              num_kv_heads=4, intermediate_size=1408, qkv_bias=True),
                  8, 8, 32, 64),
    "qwen2.5-0.5b": (hf.config_from_hf(presets.hf_config("preset:qwen2.5-0.5b")), 8, 8, 64, 512),
    # the usual reasoning shape: 128 rows x (32 + 1024) positions, 150k vocabulary
    "qwen2.5-0.5b-reasoning": (hf.config_from_hf(presets.hf_config("preset:qwen2.5-0.5b")),
                               16, 8, 32, 1024),
    # the GPU side-by-side's shapes (benchmarks/gpu_side_by_side.py)
    "qwen2.5-0.5b-256": (hf.config_from_hf(presets.hf_config("preset:qwen2.5-0.5b")),
                         8, 8, 32, 256),
    "qwen2.5-1.5b-reasoning": (hf.config_from_hf(presets.hf_config("preset:qwen2.5-1.5b")),
                               8, 8, 32, 1024),
}


def run(name: str, dtype: str, steps: int, peak_tflops: float, quick: bool,
        memory_limit_gib: float = 0.0, hbm_tbps: float = 4.8) -> dict:
  cfg, prompts, group, prompt_len, length = SHAPES[name]
  if quick:  # a smoke run of the script itself (e.g. on a CPU)
    cfg, prompts, length = cfg.replace(num_layers=1), 2, 8
  cfg = dataclasses.replace(cfg, dtype=dtype, scan_layers=cfg.num_layers > 8,
                            attention=attention.resolve("auto", jax.devices()[0].platform, dtype))
  graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
  scfg = sampling.SamplingConfig(length, (cfg.vocab_size + 1,), num_generations=group)
  gcfg = grpo.GRPOConfig(sampling=scfg, beta=0.04, loss_type="dapo")
  tx, schedule = grpo.make_optimizer(1e-6, 100)
  # the trainer's layout and memory plan (micro-batches, remat, sampler chunks per shape)
  devices = jax.devices()[:1]
  step_fn = planned.PlannedStep(
      pmap.pmap_step(grpo.GRPOStep(graphdef, tx, schedule, gcfg), devices), cfg, devices,
      memory_limit_gib)
  state = step_fn.init_state(step_fn.place_params(params))
  reference = step_fn.place_params(grpo.as_reference(params, cfg.compute_dtype))
  step_fn.note_resident(state, reference)
  del params
  rng = np.random.default_rng(0)
  batch = step_fn.place_batch((rng.integers(0, cfg.vocab_size, (prompts, prompt_len), np.int32),
                               np.ones((prompts, prompt_len), np.int32)))
  times, phases = [], {"sampling": [], "score": [], "update": []}
  for step in range(steps + 1):
    started = time.perf_counter()
    rollout = jax.block_until_ready(
        step_fn.generate(state.params, *batch, jax.random.key(step)))
    sampled = time.perf_counter()
    rewards = step_fn.place_batch(rng.random((prompts * group, 1), np.float32))
    scored, _ = jax.block_until_ready(step_fn.score(state, reference, rollout, rewards))
    score_done = time.perf_counter()
    state, metrics = step_fn.update(state, scored)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - started)
    for phase, seconds in (("sampling", sampled - started), ("score", score_done - sampled),
                           ("update", times[-1] - (score_done - started))):
      phases[phase].append(seconds)
  flops = roofline.step_flops(cfg, prompts, group, prompt_len, length, 0.04)
  steady = float(np.median(times[1:]))
  phase_s = {phase: float(np.median(values[1:])) for phase, values in phases.items()}
  stats = jax.devices()[0].memory_stats() or {}
  # what each decoded token reads on the device: the weights in the compute dtype and the
  # whole KV cache (the plan's sampler roofline, one formula)
  weights = cfg.num_params() * jax.numpy.dtype(cfg.compute_dtype).itemsize
  decode = roofline.decode_roofline(
      weights, abstract.kv_cache_bytes(cfg, prompts * group, prompt_len + length, None, 1),
      hbm_tbps * 1e12, length)
  return {"model": name, "dtype": dtype, "params_m": round(cfg.num_params() / 1e6, 1),
          "attention": cfg.attention,
          "first_step_s": round(times[0], 2), "step_s": round(steady, 3),
          **{f"{phase}_s": round(seconds, 3) for phase, seconds in phase_s.items()},
          "decode_roofline_s": round(decode["decode_seconds"], 3),
          "completion_tokens_per_s": round(prompts * group * length / steady),
          "peak_memory_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
          "mfu_percent": round(100 * flops["step"] / steady / (peak_tflops * 1e12), 1),
          "update_mfu_percent": round(
              100 * flops["train"] / phase_s["update"] / (peak_tflops * 1e12), 1),
          "memory_plan": "; ".join(
              f"{setting} ({size / 2**30:.1f} GiB)" for setting, size in
              (memory_words(step_fn, prompts * group)))}


def memory_words(step_fn, rows: int):
  """(words, planned bytes) of each program's chosen setting."""
  for program, (setting, size) in step_fn.choices.items():
    yield (setting.describe(rows, program) if program in ("sampler", "evaluator")
           else setting.describe(rows)), size


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--models", default=",".join(SHAPES))
  p.add_argument("--dtypes", default="bfloat16,float32")
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--peak-tflops", type=float, default=989.0)
  p.add_argument("--hbm-tbps", type=float, default=4.8,
                 help="HBM bandwidth of the device, TB/s (H200: 4.8; H100 SXM: 3.35)")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--memory-limit-gib", type=float, default=0.0,
                 help="the memory plan's limit per device (0: the device's own)")
  args = p.parse_args()
  device = jax.devices()[0]
  print(f"# {device.platform}: {device.device_kind}, jax {jax.__version__}")
  print("| model | dtype | params | attention | first step | step | sampling (decode roofline) "
        "| score | update | completion tok/s | peak memory | MFU (update) | memory plan |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for name in args.models.split(","):
    for dtype in args.dtypes.split(","):
      r = run(name, dtype, args.steps, args.peak_tflops, args.quick, args.memory_limit_gib,
              args.hbm_tbps)
      print(f"| {r['model']} | {r['dtype']} | {r['params_m']}M | {r['attention']} | "
            f"{r['first_step_s']} s | {r['step_s']} s | {r['sampling_s']} s "
            f"({r['decode_roofline_s']} s) | {r['score_s']} s | {r['update_s']} s | "
            f"{r['completion_tokens_per_s']} | {r['peak_memory_gib']} GiB | "
            f"{r['mfu_percent']}% ({r['update_mfu_percent']}%) | {r['memory_plan']} |",
            flush=True)
      print("json:", json.dumps(r), flush=True)


if __name__ == "__main__":
  main()
