"""The report of benchmarks/compare.py: its markdown tables and the notes under them.

compare.py measures; this formats its `Result`s (attributes read: workload, system, ok,
step times, peak RSS, wall seconds, info) and `Workload`s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from compare import Result, Workload


def fmt_s(x: float | None) -> str:
  """Seconds, 3 decimals below 10 s."""
  return "-" if x is None else (f"{x:.3f} s" if x < 10 else f"{x:.1f} s")


def fmt_mib(kib: int | None) -> str:
  """KiB as whole MiB."""
  return "-" if kib is None else f"{kib / 1024:,.0f} MiB"


def ratio(a: float | None, b: float | None) -> str:
  """a / b to 2 decimals, "-" where either is missing."""
  return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def grpo_jax_result(results: list[Result], r: Result) -> Result | None:
  """The successful grpo_jax run of r's workload, the ratios' numerator, or None."""
  return next((x for x in results if x.workload == r.workload and x.system == "grpo_jax"
               and x.ok), None)


def fmt_others(r: Result) -> str:
  """The cores' worth of CPU that other processes used during r's run."""
  others = r.info.get("others_cores")
  return "-" if others is None else f"{others:.2f} cores"


def full_length_table(results: list[Result], flops: dict[str, dict],
                      peak_gflops: float | None) -> list[str]:
  """Rows of the full-length workloads: every system does the same work per step."""
  lines = [("| workload | system | first step | second step | median steady step (n) | "
            "peak RSS | process wall | step time grpo_jax/peer | peak RSS grpo_jax/peer | "
            "MFU | others' CPU |"),
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    base, others = grpo_jax_result(results, r), fmt_others(r)
    if not r.ok:
      lines.append(f"| {r.workload} | {r.system} | failed | - | - | {fmt_mib(r.peak_rss_kib)} | "
                   f"{fmt_s(r.wall_seconds)} | - | - | - | {others} |")
      continue
    step_flops = flops.get(r.workload, {}).get("step")
    mfu = ("-" if not (step_flops and peak_gflops and r.steady_step) else
           f"{step_flops / r.steady_step / (peak_gflops * 1e9):.0%}")
    is_peer = r.system != "grpo_jax" and base is not None
    step_ratio = ratio(base.steady_step, r.steady_step) if is_peer else "-"
    rss_ratio = ratio(base.peak_rss_kib, r.peak_rss_kib) if is_peer else "-"
    lines.append(f"| {r.workload} | {r.system} | {fmt_s(r.first_step)} | "
                 f"{fmt_s(r.second_step)} | {fmt_s(r.steady_step)} ({len(r.steady_steps)}) | "
                 f"{fmt_mib(r.peak_rss_kib)} | "
                 f"{fmt_s(r.wall_seconds)} | {step_ratio} | {rss_ratio} | {mfu} | {others} |")
  return lines


def natural_eos_table(results: list[Result], peak_gflops: float | None) -> list[str]:
  """Rows of the natural-EOS workloads: each system's work per step follows its own
  completion lengths, so speed is compared per completion token, and MFU is each system's
  model FLOPs (at its lengths) per second."""
  lines = [("| workload | system | first step | median steady step (n) | mean completion "
            "length | completion tokens/s | s per token grpo_jax/peer | peak RSS | "
            "peak RSS grpo_jax/peer | model GFLOP per step | MFU | others' CPU |"),
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    base, others = grpo_jax_result(results, r), fmt_others(r)
    if not r.ok or "completion_tokens_per_s" not in r.info:
      lines.append(f"| {r.workload} | {r.system} | failed | - | - | - | - | "
                   f"{fmt_mib(r.peak_rss_kib)} | - | - | - | {others} |")
      continue
    info = r.info
    is_peer = r.system != "grpo_jax" and base is not None
    token_ratio = ratio(info["completion_tokens_per_s"],
                        base.info.get("completion_tokens_per_s")) if is_peer else "-"
    rss_ratio = ratio(base.peak_rss_kib, r.peak_rss_kib) if is_peer else "-"
    mfu = "-" if not peak_gflops else f"{info['model_flop_per_s'] / (peak_gflops * 1e9):.0%}"
    lines.append(f"| {r.workload} | {r.system} | {fmt_s(r.first_step)} | "
                 f"{fmt_s(r.steady_step)} ({len(r.steady_steps)}) | "
                 f"{info['mean_completion_length']} | {info['completion_tokens_per_s']:,.1f} | "
                 f"{token_ratio} | {fmt_mib(r.peak_rss_kib)} | {rss_ratio} | "
                 f"{info['step_gflop']:,.0f} | {mfu} | {others} |")
  return lines


def describe(name: str, w: Workload, flops: dict | None, prompt_lengths: tuple | None) -> str:
  """One line: the workload's model and batch (and its model FLOPs at full length)."""
  shape = (f"hidden {w.hidden_size}, {w.num_layers} layers, {w.num_heads}/{w.num_kv_heads} "
           f"heads, intermediate {w.intermediate_size}, vocab {w.vocab_size}, tied")
  if w.model == "smollm2":
    low, mean, high = prompt_lengths or ("?", "?", "?")
    return (f"- {name}: SmolLM2-135M-Instruct (Llama, the GGUF's weights dequantized to "
            f"float32), {shape}; {w.prompts_per_step} prompts x G={w.num_generations}: chat "
            f"word problems of {low}-{high} tokens (mean {mean}, left-padded to "
            f"{w.max_prompt_length}), up to {w.max_completion_length} new tokens ending at "
            f"the model's EOS; temperature {w.temperature}, beta {w.beta}, loss {w.loss_type} "
            f"(TRL loss_type {w.loss_type}, Tunix loss_agg_mode token-mean), reward "
            f"{w.reward} (benchmarks/smollm2_reward.py)")
  line = (f"- {name}: Qwen2 {shape}; {w.prompts_per_step} prompts x G={w.num_generations}, "
          f"{w.max_completion_length} new tokens, beta {w.beta}")
  if flops:
    line += (f"; model GFLOP per step {flops['step'] / 1e9:,.0f} (sampling "
             f"{flops['sampling'] / 1e9:,.0f}, reference {flops['reference'] / 1e9:,.0f}, "
             f"train {flops['train'] / 1e9:,.0f})")
  return line


def table(results: list[Result], workloads: dict[str, Workload], flops: dict[str, dict],
          peak_gflops: float | None, prompt_lengths: dict[str, tuple] | None = None) -> str:
  """The report: a table of the full-length workloads, one of the natural-EOS workloads
  (where run), the workloads' shapes, grpo_jax's memory plans and how MFU is computed."""
  fixed = [r for r in results if not workloads[r.workload].natural_eos]
  natural = [r for r in results if workloads[r.workload].natural_eos]
  out = []
  if fixed:
    out += [*full_length_table(fixed, flops, peak_gflops), ""]
  if natural:
    out += [*natural_eos_table(natural, peak_gflops), ""]
  out += [describe(name, w, flops.get(name), (prompt_lengths or {}).get(name))
          for name, w in workloads.items()]
  plans = [f"- {r.workload}: " + "; ".join(r.info["memory_plan"]) for r in results
           if r.system == "grpo_jax" and r.info.get("memory_plan")]
  if plans:
    out += ["", "grpo_jax's memory plan (settings chosen at start-up, GiB per device of "
            "the programs as XLA sizes them, against the limit):", *plans]
  peak = ("-" if peak_gflops is None else f"{peak_gflops:,.0f} GFLOP/s")
  out += ["", f"MFU: model FLOPs per step / (median steady step x this machine's float32 "
          f"matmul throughput, {peak}, measured in this run by benchmarks/matmul_peak.py)."]
  if natural:
    out.append(
        "Natural EOS: mean completion length, completion tokens/s and MFU are over the steady "
        "steps, from each system's logged per-step mean completion length (grpo_jax and TRL "
        "count the EOS token, Tunix does not); MFU there is the steady steps' model FLOPs "
        "(each step's at its own mean completion length and the prompts' mean length) / "
        "their seconds / the matmul throughput. s per token grpo_jax/peer: below 1, "
        "grpo_jax spends less time per completion token.")
  return "\n".join(out)
