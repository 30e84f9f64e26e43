"""Actor + reference + optimizer bytes of full fine-tuning and LoRA, for real model shapes.

  python benchmarks/lora_memory.py [--models qwen2.5-0.5b,qwen2.5-7b] [--ranks 8,16]

Everything is measured from the arrays grpo_jax allocates, as abstract shapes
(`jax.eval_shape`: nothing is allocated): the model state `Transformer` builds, the frozen
reference or base as the loop places it (`lora.prepare_base` then `grpo.as_reference`),
and the AdamW state `tx.init` builds over what is trained (adapters only with LoRA).
Bytes are the arrays' sizes x bits (`quantize.stored_bytes`: 4-bit nf4 values count half
a byte, as XLA packs them on TPU; a CPU buffer spends a byte on each). Totals for the
whole model, before any sharding: divide by the chips of an FSDP mesh.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# (layout, compute dtype, lora.base_dtype, lora.base_quantization); rank 0: full fine-tuning.
LAYOUTS = [
    ("full fine-tuning", "float32", None, None),
    ("full fine-tuning", "bfloat16", None, None),
    ("LoRA, float32 base", "float32", "float32", "none"),
    ("LoRA, bfloat16 base", "bfloat16", "bfloat16", "none"),
    ("QLoRA, int8 base", "bfloat16", "bfloat16", "int8"),
    ("QLoRA, nf4 base", "bfloat16", "bfloat16", "nf4"),
]


def measure(model_cfg, rank: int, compute: str, base_dtype, quantization):
  """{actor, reference, optimizer} bytes of one layout."""
  import jax
  from flax import nnx

  from grpo_jax import grpo
  from grpo_jax.models import Transformer, lora
  from grpo_jax.models.quantize import stored_bytes

  cfg = model_cfg.replace(dtype=compute)
  tx, _ = grpo.make_optimizer(1e-5, 100)
  _, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
  if base_dtype is None:  # full fine-tuning: actor, its AdamW state, a reference copy
    reference = jax.eval_shape(lambda p: grpo.as_reference(p, cfg.compute_dtype), params)
    trained = params
  else:  # LoRA: the adapters and their AdamW state; the base is the reference
    adapters_cfg = lora.LoraConfig(rank=rank, alpha=2.0 * rank)
    _, trained = lora.adapted_model(cfg, adapters_cfg)
    reference = jax.eval_shape(lambda p: grpo.as_reference(
        lora.prepare_base(p, base_dtype, quantization), cfg.compute_dtype), params)
  opt = jax.eval_shape(tx.init, trained)
  return {"actor": stored_bytes(trained), "reference": stored_bytes(reference),
          "optimizer": stored_bytes(opt)}


def main():
  from grpo_jax.models import hf, presets

  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="qwen2.5-0.5b,qwen2.5-7b")
  p.add_argument("--ranks", default="16")
  a = p.parse_args()
  gib = lambda n: f"{n / 2**30:.2f}"
  print("| model | layout | compute | actor (trained) GiB | reference / frozen base GiB | "
        "AdamW GiB | total GiB |")
  print("|---|---|---|---:|---:|---:|---:|")
  for name in a.models.split(","):
    cfg = hf.config_from_hf(presets.hf_config(f"preset:{name}"))
    for rank in [int(r) for r in a.ranks.split(",")]:
      for layout, compute, base_dtype, quantization in LAYOUTS:
        if base_dtype is None and rank != int(a.ranks.split(",")[0]):
          continue  # full fine-tuning has no rank: once per model
        m = measure(cfg, rank, compute, base_dtype, quantization)
        label = layout if base_dtype is None else f"{layout}, rank {rank} all-linear"
        print(f"| {name} ({cfg.num_params() / 1e9:.2f}B) | {label} | {compute} | "
              f"{gib(m['actor'])} | {gib(m['reference'])} | {gib(m['optimizer'])} | "
              f"{gib(sum(m.values()))} |")


if __name__ == "__main__":
  main()
