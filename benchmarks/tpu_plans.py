"""Compiled HBM per chip for TPU slices (libtpu, no TPU): the planning checks and the table
in docs/tpu.md.

  python benchmarks/tpu_plans.py checks            # the FSDP acceptance figures
  python benchmarks/tpu_plans.py table [--out F]   # presets x slices x param dtypes (JSONL)
  python benchmarks/tpu_plans.py markdown --out F  # docs/tpu.md's table from that JSONL

Every figure comes from `grpo_jax.plan` on the gsm8k recipe (16 prompts x G=8, 256 + 384
tokens, bf16 compute, scanned layers), the layout all-FSDP over the slice, with the
settings the memory plan chooses (micro-batches, remat, sampler chunks: what the trainer
would run). results/tpu_plans.jsonl holds the earlier table (remat set by hand, no
micro-batches); results/tpu_plans_auto.jsonl the planned one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "configs"))

import gsm8k  # noqa: E402

from grpo_jax.plan import programs, report, topology  # noqa: E402

GiB = 2**30
SLICES = ("v5e-8", "v5e-16", "v4-32", "v6e-8")
PRESETS = ("smollm2-135m", "smollm2-360m", "qwen2.5-0.5b", "qwen3-0.6b", "llama3.2-1b",
           "qwen2.5-1.5b", "qwen3-1.7b", "smollm2-1.7b", "qwen2.5-3b", "llama3.2-3b",
           "qwen3-4b", "qwen2.5-7b", "llama3.1-8b", "qwen3-8b")


def gsm8k_config(preset: str, chips: int, **changes):
  c = gsm8k.get_config()
  c.model_path = f"preset:{preset}"
  c.parallelism = "mesh"
  c.mesh.update(data=1, fsdp=chips, tensor=1)
  c.update(changes)
  return c


def plan(preset: str, topo: str, **changes) -> dict:
  """The plan as a dict, at the memory plan's settings."""
  s = topology.parse(topo)
  config = gsm8k_config(preset, s.num_chips, **changes)
  started = time.perf_counter()
  compiled = programs.compile_plan(config, s.devices(), limit=s.memory_limit())
  d = report.plan_dict(compiled, s, config)
  d["wall_seconds"] = time.perf_counter() - started
  return d


def checks() -> int:
  ok = True
  small = plan("qwen2.5-0.5b", "v5e-8")
  print(report.format_plan(small), "\n")
  update = small["phases"]["update"]["total_bytes"] / GiB
  print(f"[check] Qwen2.5-0.5B update on v5e-8, fsdp=8: {update:.2f} GiB per chip (<= 3)")
  ok &= update <= 3.0
  half = plan("qwen2.5-0.5b", "v5e:2x2")
  ratio = half["phases"]["update"]["temp_bytes"] / small["phases"]["update"]["temp_bytes"]
  print(f"[check] update temporaries fsdp=4 (v5e:2x2) / fsdp=8 (v5e-8), same global batch: "
        f"{half['phases']['update']['temp_bytes'] / GiB:.2f} / "
        f"{small['phases']['update']['temp_bytes'] / GiB:.2f} GiB = {ratio:.2f}x (>= 1.7)")
  ok &= ratio >= 1.7
  vocab = small["phases"]["sampler"]["vocab_collectives"]
  per_token = [c for c in vocab if c["count"] > 1]
  once = [c for c in vocab if c["count"] == 1]
  print(f"[check] sampler collectives with a vocabulary dimension: {len(per_token)} per decoded "
        f"token; {len(once)} per rollout ({', '.join(str(tuple(c['shape'])) for c in once)}: "
        "the LM head gathered once)")
  ok &= not per_token
  big = plan("qwen2.5-7b", "v5e-16")
  print("\n" + report.format_plan(big), "\n")
  print(f"[check] Qwen2.5-7B on v5e-16, fsdp=16: {'FITS' if big['fits'] else 'DOES NOT FIT'} "
        f"(peak {big['peak_bytes'] / GiB:.2f} GiB)")
  ok &= big["fits"]
  for name, ph in big["phases"].items():
    print(f"  {name}: total {ph['total_bytes'] / GiB:.2f} GiB = params "
          f"{ph['params_bytes'] / GiB:.2f} + AdamW {ph['optimizer_bytes'] / GiB:.2f} + reference "
          f"{ph['reference_bytes'] / GiB:.2f} + temporaries {ph['temp_bytes'] / GiB:.2f} (KV cache "
          f"{ph['kv_cache_bytes'] / GiB:.2f}) + other {ph['other_bytes'] / GiB:.2f}")
  print("all checks passed" if ok else "SOME CHECKS FAILED")
  return 0 if ok else 1


def table(out: str, presets, slices, param_dtypes) -> None:
  done = set()
  if os.path.exists(out):
    for line in open(out):
      r = json.loads(line)
      done.add((r["preset"], r["topology"], r["param_dtype"]))
  for preset in presets:
    for topo in slices:
      for param_dtype in param_dtypes:
        if (preset, topo, param_dtype) in done:
          continue
        d = plan(preset, topo, param_dtype=param_dtype)
        row = {"preset": preset, "topology": topo, "param_dtype": param_dtype,
               "memory_plan": d["memory_plan"], "flags": d["memory_flags"],
               "peak_gib": d["peak_bytes"] / GiB, "fits": d["fits"],
               "step_seconds": d["estimated_step_seconds"],
               "phases_gib": {k: v["total_bytes"] / GiB for k, v in d["phases"].items()},
               "tried": d["memory_tried"], "wall_seconds": d["wall_seconds"]}
        with open(out, "a") as f:
          f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def markdown(path: str) -> str:
  rows = [json.loads(line) for line in open(path)]
  lines = ["| model | slice | params | update (memory plan) | sampler | reference | update | "
           "peak / chip | fits | est. step |", "|---|---|---|---|---|---|---|---|---|---|"]
  order = {p: i for i, p in enumerate(PRESETS)}
  slices = {t: i for i, t in enumerate(SLICES)}
  for r in sorted(rows, key=lambda r: (order.get(r["preset"], 99), slices.get(r["topology"], 99),
                                       r["param_dtype"])):
    ph = r["phases_gib"]
    update = r["memory_plan"].get("update") or "nothing fits"
    lines.append(f"| {r['preset']} | {r['topology']} | {r['param_dtype']} | {update} | "
                 f"{ph['sampler']:.2f} | {ph['reference']:.2f} | {ph['update']:.2f} | "
                 f"{r['peak_gib']:.2f} GiB | {'FITS' if r['fits'] else 'DOES NOT FIT'} | "
                 f"{r['step_seconds']:.1f} s |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("what", choices=("checks", "table", "markdown"))
  parser.add_argument("--out", default=os.path.join(HERE, "results", "tpu_plans_auto.jsonl"))
  parser.add_argument("--presets", default=",".join(PRESETS))
  parser.add_argument("--slices", default=",".join(SLICES))
  parser.add_argument("--param-dtypes", default="float32,bfloat16")
  args = parser.parse_args()
  if args.what == "checks":
    return checks()
  if args.what == "markdown":
    print(markdown(args.out))
    return 0
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  table(args.out, args.presets.split(","), args.slices.split(","),
        args.param_dtypes.split(","))
  return 0


if __name__ == "__main__":
  sys.exit(main())
