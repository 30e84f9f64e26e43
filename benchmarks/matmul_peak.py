"""This machine's float32 matmul throughput, the yardstick of compare.py's MFU column.

  python benchmarks/matmul_peak.py jax|torch [--size 2048] [--repeats 20]

Prints one JSON line: {"backend", "size", "gflops"}: the best of `repeats` timed
[size x size] @ [size x size] float32 products (2 * size^3 FLOPs each), on every core the
library uses by default. Run by compare.py once per invocation with JAX (grpo_jax's venv)
and with torch (the TRL venv); the larger of the two is the machine's matmul throughput.
"""

from __future__ import annotations

import argparse
import json
import time


def best_seconds(fn, repeats: int) -> float:
  fn()  # warm-up: compilation, thread pools, page faults
  best = float("inf")
  for _ in range(repeats):
    started = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - started)
  return best


def main():
  p = argparse.ArgumentParser()
  p.add_argument("backend", choices=["jax", "torch"])
  p.add_argument("--size", type=int, default=2048)
  p.add_argument("--repeats", type=int, default=20)
  a = p.parse_args()
  n = a.size
  if a.backend == "jax":
    import jax
    import jax.numpy as jnp
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    y = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    seconds = best_seconds(lambda: matmul(x, y).block_until_ready(), a.repeats)
  else:
    import torch
    x, y = torch.randn(n, n), torch.randn(n, n)
    seconds = best_seconds(lambda: torch.mm(x, y), a.repeats)
  print(json.dumps({"backend": a.backend, "size": n, "gflops": 2 * n**3 / seconds / 1e9}))


if __name__ == "__main__":
  main()
