"""The attention kernels of full-sequence passes side by side on this machine: time and
compiled temporaries of a train pass (forward + backward of every layer) per kernel and
sequence length. What `models.attention.CPU_FLASH_FROM` was chosen from.

  python benchmarks/attention_kernels.py [--kernels xla,flash] [--lengths 288,544,1056,2080]
      [--rows 2] [--repeats 5]

Model: the `small` / `long` workloads' shape (hidden 512, 4 layers, 8 heads / 4 kv heads,
intermediate 1408, vocabulary 4096), float32, every position real.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax.models import ModelConfig, Transformer, attention

MODEL = ModelConfig(vocab_size=4096, hidden_size=512, num_layers=4, num_heads=8,
                    num_kv_heads=4, intermediate_size=1408, qkv_bias=True)


def measure(kernel: str, rows: int, length: int, repeats: int) -> dict:
  graphdef, params = nnx.split(Transformer(MODEL.replace(attention=kernel), nnx.Rngs(0)))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 4096, (rows, length)), jnp.int32)

  def loss(params, ids):
    model = nnx.merge(graphdef, params)
    mask = jnp.ones_like(ids)
    hidden, _ = model.hidden_states(ids, jnp.cumsum(mask, axis=1) - 1, mask)
    return jnp.mean(hidden ** 2)

  compiled = jax.jit(jax.grad(loss)).lower(params, ids).compile()
  jax.block_until_ready(compiled(params, ids))
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    jax.block_until_ready(compiled(params, ids))
    times.append(time.perf_counter() - started)
  return {"kernel": kernel, "rows": rows, "length": length,
          "seconds": float(np.median(times)),
          "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--kernels", default="xla,flash")
  p.add_argument("--lengths", default="288,544,1056,2080")
  p.add_argument("--rows", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  a = p.parse_args()
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, flash block "
        f"{attention.ATTENTION_BLOCK}")
  print("| positions | kernel | train pass (fwd + bwd) | temporaries |")
  print("|---|---|---|---|")
  for length in map(int, a.lengths.split(",")):
    for kernel in a.kernels.split(","):
      r = measure(kernel, a.rows, length, a.repeats)
      print(f"| {length} | {kernel} | {r['seconds']:.3f} s | {r['temp_mib']:.0f} MiB |",
            flush=True)


if __name__ == "__main__":
  main()
