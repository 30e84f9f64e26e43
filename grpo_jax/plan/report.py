"""A compiled plan as a table (what `python -m grpo_jax.plan` prints) and as a dict (JSON)."""

from __future__ import annotations

from typing import Any

from grpo_jax.plan import programs, roofline, topology

GiB = topology.GiB


def phase_figures(plan: programs.Plan, phase: programs.Phase, chip: topology.Chip
                  ) -> dict[str, Any]:
  total = phase.total(plan.resident)
  seconds, bound = roofline.estimate(phase.flops_per_chip, phase.hbm_bytes_per_chip,
                                     phase.ici_bytes, chip)
  return {
      "params_bytes": plan.params, "optimizer_bytes": plan.optimizer,
      "reference_bytes": plan.reference,
      "kv_cache_bytes": plan.kv_cache if phase.name == "sampler" else 0,
      "temp_bytes": phase.temp_bytes,
      "other_bytes": total - plan.resident - phase.temp_bytes,
      # a program the compiler refused does not fit, whatever its parsed size
      "total_bytes": total, "fits": total <= chip.hbm_bytes and not phase.out_of_memory,
      "collectives": phase.collectives, "ici_bytes": phase.ici_bytes,
      "estimated_seconds": seconds, "bound": bound, "flops_per_chip": phase.flops_per_chip,
      "compile_seconds": phase.compile_seconds, "out_of_memory": phase.out_of_memory,
      # collectives whose buffer has a vocabulary-sized dimension (logits or the LM head)
      "vocab_collectives": [{"kind": c.kind, "shape": list(c.shape), "count": c.count}
                            for c in phase.found if plan.model.vocab_size in c.shape],
  }


def plan_dict(plan: programs.Plan, slice_: topology.Slice, config) -> dict[str, Any]:
  phases = {name: phase_figures(plan, p, slice_.chip) for name, p in plan.phases.items()}
  peak = max(p["total_bytes"] for p in phases.values())
  limit = plan.limit or slice_.chip.hbm_bytes
  update = plan.settings.get("update")
  return {
      "topology": slice_.name, "chips": slice_.num_chips, "generation": slice_.chip.generation,
      "hbm_bytes": slice_.chip.hbm_bytes, "layout": plan.layout,
      "model_path": config.model_path or "demo", "num_params": plan.model.num_params(),
      "dtype": config.dtype, "param_dtype": config.param_dtype, "remat": plan.remat,
      "attention": plan.model.attention,
      "prompts_per_step": config.prompts_per_step, "num_generations": config.num_generations,
      "max_prompt_length": config.max_prompt_length,
      "max_completion_length": config.max_completion_length,
      "phases": phases, "peak_bytes": peak, "limit_bytes": limit,
      "fits": all(p["fits"] for p in phases.values()) and all(plan.settings.values()),
      # the memory plan's choice (what the trainer runs with this config on this slice)
      "memory_plan": plan.described,
      "micro_batch_size": update.rows if update else None,
      "memory_flags": update.flags(plan.rows_per_shard) if update else "",
      "memory_tried": {name: [[words, None if size is None else (
          "refused" if size == float("inf") else size / GiB)] for words, size in steps]
                       for name, steps in plan.tried.items()},
      "estimated_step_seconds": sum(p["estimated_seconds"] for p in phases.values()),
      # per chip: the weights decoding reads and this chip's KV cache
      "decode_roofline": roofline.decode_roofline(
          plan.decode_weights, plan.kv_cache, slice_.chip.hbm_bandwidth,
          config.max_completion_length),
      "lora": lora_figures(plan),
  }


def lora_figures(plan: programs.Plan) -> dict[str, Any] | None:
  """With LoRA, per chip: the adapters (the trainable params), their AdamW state, and the
  frozen base, which is the reference (one copy; the phases' reference_bytes). Bytes count
  4-bit values at half a byte (`quantize.stored_bytes`' rule, as XLA on TPU packs them);
  `xla_base_bytes` is the base as the TPU compiler sizes it (the sampler's argument bytes
  less the adapters and the batch), None where it refused the sampler."""
  if plan.lora is None:
    return None
  return {**plan.lora, "adapter_bytes": plan.params, "adapter_optimizer_bytes": plan.optimizer,
          "base_bytes": plan.reference,
          "bytes_counted": "4-bit values at half a byte (quantize.stored_bytes); "
                           "xla_base_bytes: the TPU compiler's argument bytes"}


def _gib(x: float) -> str:
  return f"{x / GiB:.2f}"


def _collectives(collectives: dict[str, dict[str, float]]) -> str:
  short = {"all-gather": "AG", "all-reduce": "AR", "reduce-scatter": "RS",
           "all-to-all": "A2A", "collective-permute": "CP"}
  parts = [f"{short[k]} {v['moved_bytes'] / 1e9:.2f}" for k, v in collectives.items()
           if v["moved_bytes"] >= 1e6]
  return ", ".join(parts) or "-"


def _lora_line(lo: dict[str, Any]) -> str:
  quant = "not quantised" if lo["quantization"] == "none" else f"{lo['quantization']} kernels"
  xla = ("" if lo.get("xla_base_bytes") is None
         else f"; TPU compiler: {_gib(lo['xla_base_bytes'])} GiB")
  return (f"LoRA rank {lo['rank']}, alpha {lo['alpha']:g}, on {','.join(lo['targets'])}: "
          f"{lo['adapter_params'] / 1e6:.2f}M float32 adapter parameters trained "
          f"({_gib(lo['adapter_bytes'])} GiB + AdamW {_gib(lo['adapter_optimizer_bytes'])} GiB"
          f" per chip); frozen base {lo['base_dtype']}, {quant}, is the reference (one copy):"
          f" {_gib(lo['base_bytes'])} GiB per chip (4-bit values at half a byte{xla})")


def format_plan(d: dict[str, Any]) -> str:
  chip = topology.CHIPS[d["generation"]]
  lo = d.get("lora")
  stored = "LoRA adapters on a frozen base" if lo else f"{d['param_dtype']} parameters"
  columns = (("adapters", "AdamW", "base = ref") if lo else ("params", "AdamW", "reference"))
  lines = [
      f"model {d['model_path']}: {d['num_params'] / 1e9:.3f}B parameters, {d['dtype']} "
      f"compute, {stored}, remat {'on' if d['remat'] else 'off'}, "
      f"attention {d.get('attention', 'xla')}",
      *([_lora_line(lo)] if lo else []),
      f"slice {d['topology']}: {d['chips']} x {d['generation']} chips, "
      f"{chip.hbm_bytes / GiB:.0f} GiB HBM, {chip.bf16_flops / 1e12:.0f} TFLOP/s bf16, "
      f"{chip.hbm_bandwidth / 1e9:.0f} GB/s HBM, {chip.ici_bandwidth / 1e9:.0f} GB/s ICI each",
      f"layout {d['layout']}; batch {d['prompts_per_step']} prompts x G={d['num_generations']},"
      f" {d['max_prompt_length']} + {d['max_completion_length']} tokens",
      "",
      f"per chip, GiB   | {columns[0]:>8} | {columns[1]} | {columns[2]:>10} | KV cache | "
      "temporaries | other | total | fits | collectives sent, GB | est. time | bound | compile",
      "----------------|----------|-------|------------|----------|-------------|-------|------"
      "-|------|----------------------|-----------|-------|--------",
  ]
  for name, p in d["phases"].items():
    lines.append(
        f"{name:<15} | {_gib(p['params_bytes']):>8} | {_gib(p['optimizer_bytes']):>5} | "
        f"{_gib(p['reference_bytes']):>10} | {_gib(p['kv_cache_bytes']):>8} | "
        f"{_gib(p['temp_bytes']):>11} | {_gib(p['other_bytes']):>5} | "
        f"{_gib(p['total_bytes']):>5} | {'yes' if p['fits'] else 'NO':<4} | "
        f"{_collectives(p['collectives']):<20} | {p['estimated_seconds']:>8.3f}s | "
        f"{p['bound']:<5} | {p['compile_seconds']:.0f}s")
    if p["out_of_memory"]:
      lines.append(f"{'':<15}   XLA: {p['out_of_memory']}")
  lines += ["", roofline.describe_decode(d["decode_roofline"], chip.hbm_bandwidth,
                                        d["max_completion_length"])]
  verdict = "FITS" if d["fits"] else "DOES NOT FIT"
  chosen = [text for text in d["memory_plan"].values() if text]
  lines += ["", f"memory plan: {'; '.join(chosen)} ({d['memory_flags']})" if all(
      d["memory_plan"].values()) else "memory plan: " + "; ".join(
          f"{name}: {text or 'nothing fits'}" for name, text in d["memory_plan"].items())]
  for name, steps in d.get("memory_tried", {}).items():
    if len(steps) > 1:
      lines.append(f"  {name} tried: " + ", ".join(
          f"{words} ({'estimated over' if size is None else size if size == 'refused' else f'{size:.2f} GiB'})"
          for words, size in steps))
  lines += ["", f"{verdict}: peak {_gib(d['peak_bytes'])} GiB of "
            f"{d['limit_bytes'] / GiB:.1f} GiB per chip; estimated step "
            f"{d['estimated_step_seconds']:.2f} s (roofline: analytic FLOPs, HBM and ICI bytes "
            "against the chip's peaks; the KV cache is part of the sampler's temporaries)"]
  return "\n".join(lines)
