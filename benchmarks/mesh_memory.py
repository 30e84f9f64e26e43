"""Per-device bytes of actor + reference + AdamW state in pmap and mesh layouts.

  python benchmarks/mesh_memory.py   (uses 8 fake CPU devices)

Measured from the placed arrays' shardings (not estimated) for the `small` benchmark model
(Qwen2 layout, hidden 512, 4 layers, 8 heads / 4 kv heads, intermediate 1408, vocab 4096,
tied), and computed from parameter counts for real model sizes.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from grpo_jax import grpo, sampling  # noqa: E402
from grpo_jax.layouts import mesh, pmap  # noqa: E402
from grpo_jax.models import ModelConfig, Transformer  # noqa: E402

SMALL = ModelConfig(vocab_size=4096, hidden_size=512, num_layers=4, num_heads=8,
                    num_kv_heads=4, intermediate_size=1408, qkv_bias=True)
REAL = {"0.5B (Qwen2.5-0.5B)": 494e6, "1.5B (Qwen2.5-1.5B)": 1.54e9,
        "3B (Qwen2.5-3B)": 3.09e9, "7B (Qwen2.5-7B)": 7.62e9}


def main():
  graphdef, params = nnx.split(Transformer(SMALL, nnx.Rngs(0)))
  cfg = grpo.GRPOConfig(sampling=sampling.SamplingConfig(8, (1,), num_generations=2))
  tx, schedule = grpo.make_optimizer(1e-6, 10)
  step = grpo.GRPOStep(graphdef, tx, schedule, cfg)
  device = jax.devices()[0]
  layouts = {"pmap x8": pmap.pmap_step(step, jax.devices()),
             "mesh data=8": mesh.mesh_step(step, mesh.make_mesh(8, 1, 1)),
             "mesh fsdp=4 x data=2": mesh.mesh_step(step, mesh.make_mesh(2, 4, 1)),
             "mesh fsdp=8": mesh.mesh_step(step, mesh.make_mesh(1, 8, 1)),
             "mesh tensor=2 x fsdp=4": mesh.mesh_step(step, mesh.make_mesh(1, 4, 2))}
  print(f"small model: {SMALL.num_params() / 1e6:.1f}M parameters (float32)")
  print("| layout | actor + reference + AdamW per device | vs pmap |")
  print("|---|---|---|")
  base = None
  for name, fn in layouts.items():
    actor = fn.place_params(params)
    state, reference = fn.init_state(actor), fn.place_params(params)
    size = mesh.per_device_bytes((state.params, state.opt_state, reference), device)
    base = base or size
    print(f"| {name} | {size / 2**20:.1f} MiB | {size / base:.3f} |")
  print("\nComputed (float32 actor 4 B + reference 4 B + AdamW 8 B = 16 B per parameter):")
  print("| model | pmap (per chip) | mesh fsdp=8 | mesh fsdp=16 | mesh fsdp=32 |")
  print("|---|---|---|---|---|")
  for name, n in REAL.items():
    total = 16 * n / 2**30
    print(f"| {name} | {total:.1f} GiB | {total / 8:.1f} GiB | {total / 16:.1f} GiB | "
          f"{total / 32:.1f} GiB |")


if __name__ == "__main__":
  main()
