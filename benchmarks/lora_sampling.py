"""LoRA sampling: adapters kept separate (x W + s (x A) B at every decoded token) or merged
into the kernels once per rollout (W + s A B, then the plain model)?

  python benchmarks/lora_sampling.py [--sizes demo,mid] [--rank 8] [--repeats 5]

Times `sampling.generate` both ways on random models (the numbers do not depend on the
weights' values), after a compile, as the median of --repeats rollouts, and prints the
ratio with the CPU named. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SIZES = {  # (hidden, layers, heads, kv heads, intermediate, vocab, prompts x G, length)
    "demo": (64, 2, 4, 2, 256, 40, (16, 8), 24),  # configs/default.py's model and batch
    "mid": (512, 8, 8, 2, 1536, 8192, (8, 8), 64),
}


def main():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from benchmarks.variants_learn import cpu_name
  from grpo_jax import sampling
  from grpo_jax.models import ModelConfig, Transformer, lora

  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", default="demo,mid")
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--repeats", type=int, default=5)
  a = p.parse_args()
  print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; JAX {jax.__version__}; rank {a.rank}, "
        "all-linear")
  print(f"{'model':6} {'params':>10} {'separate s':>11} {'merged s':>9} {'merged/separate':>16}")
  for name in a.sizes.split(","):
    d, layers, heads, kv, ff, vocab, (prompts, g), length = SIZES[name]
    cfg = ModelConfig(vocab_size=vocab, hidden_size=d, num_layers=layers, num_heads=heads,
                      num_kv_heads=kv, intermediate_size=ff)
    base_def, base = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    adapters_cfg = lora.LoraConfig(rank=a.rank, alpha=16.0)
    policy_def, like = lora.adapted_model(cfg, adapters_cfg)
    adapters = jax.tree.map(lambda x: x + 0.01, lora.init_adapters(like, jax.random.key(1)))
    scfg = sampling.SamplingConfig(max_completion_length=length, eos_token_ids=(vocab + 1,),
                                   num_generations=g)  # an EOS never drawn: full length
    ids = np.random.default_rng(0).integers(3, vocab, size=(prompts, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    separate = jax.jit(lambda b, ad, key: sampling.generate(
        policy_def, lora.policy_params(b, ad), ids, mask, key, scfg))
    merged = jax.jit(lambda b, ad, key: sampling.generate(
        base_def, lora.merged_kernels(b, ad, adapters_cfg), ids, mask, key, scfg))

    def seconds(fn):
      jax.block_until_ready(fn(base, adapters, jax.random.key(0)))  # compile
      times = []
      for r in range(a.repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(base, adapters, jax.random.key(r)))
        times.append(time.perf_counter() - start)
      return float(np.median(times))

    t_sep, t_merged = seconds(separate), seconds(merged)
    print(f"{name:6} {cfg.num_params():>10,} {t_sep:11.4f} {t_merged:9.4f} "
          f"{t_merged / t_sep:16.2f}")


if __name__ == "__main__":
  main()
