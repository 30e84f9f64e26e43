"""Analytic FLOPs of a GRPO step and a roofline estimate of each phase on a chip.

XLA's `cost_analysis()` counts a while-loop body once (the sampler's decode loop, the
scanned layers, the vocabulary chunks) and its time estimates are not usable for these
programs, so time comes from model FLOPs and bytes against the chip's peaks: each phase
takes at least as long as its FLOPs at the bf16 peak, its HBM traffic at the HBM
bandwidth, and its collectives at the interconnect bandwidth; the largest bound is the
estimate, and names what dominates.
"""

from __future__ import annotations

from grpo_jax.models import ModelConfig


def step_flops(cfg: ModelConfig, prompts: int, num_generations: int, prompt_tokens: int,
               completion_length: int, beta: float) -> dict[str, float]:
  """Model FLOPs of one GRPO step: matmuls only (2 per multiply-add), causal attention
  counted for the keys a query can see, vocabulary projections only where a log-prob or a
  next token is needed.

  sampling: each prompt prefilled once, then prompts * G rows decode the completion;
  reference: one forward pass (beta > 0); train: forward + backward = 3 forward passes.
  """
  d, heads, kv_heads, layers, hd = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                                    cfg.num_layers, cfg.head_dim)
  projections = 2 * (d * heads * hd + 2 * d * kv_heads * hd + heads * hd * d
                     + 3 * d * cfg.intermediate_size)  # per token per layer
  attention = lambda keys: 2 * 2 * heads * hd * keys  # one query: scores + weighted values
  head = 2 * d * cfg.vocab_size
  rows, length = prompts * num_generations, completion_length
  seq = prompt_tokens + length
  # Closed forms of the sums over positions (keys seen by query i: i + 1).
  sum_keys = lambda first, last: (first + last) * (last - first + 1) // 2
  prefill = prompts * (layers * (prompt_tokens * projections
                                 + attention(1) * sum_keys(1, prompt_tokens)) + head)
  decode = rows * (layers * ((length - 1) * projections
                             + attention(1) * sum_keys(prompt_tokens + 2, prompt_tokens + length))
                   + (length - 1) * head)
  forward = rows * (layers * (seq * projections + attention(1) * sum_keys(1, seq))
                    + length * head)
  flops = {"sampling": prefill + decode, "reference": forward if beta > 0 else 0,
           "train": 3 * forward}
  flops["step"] = sum(flops.values())
  return flops


def estimate(flops: float, hbm_bytes: float, ici_bytes: float, chip) -> tuple[float, str]:
  """(seconds, the bound that dominates) for one chip's share of a phase."""
  bounds = {"compute": flops / chip.bf16_flops, "HBM": hbm_bytes / chip.hbm_bandwidth,
            "ICI": ici_bytes / chip.ici_bandwidth}
  bound = max(bounds, key=bounds.get)
  return bounds[bound], bound


def decode_roofline(weight_bytes: float, kv_cache_bytes: float, hbm_bandwidth: float = 0.0,
                    tokens: int = 0) -> dict[str, float]:
  """The floor of the sampler's decode loop on one chip: each decoded token reads every
  weight once and the whole KV cache (the sampler scores every slot, the empty ones masked),
  so a token takes at least (weights + cache) / HBM bandwidth, and `tokens` of them that
  times `tokens`. Decoding is bound by memory, not FLOPs, on every accelerator."""
  per_token = weight_bytes + kv_cache_bytes
  seconds = per_token / hbm_bandwidth if hbm_bandwidth else 0.0
  return {"weight_bytes": weight_bytes, "kv_cache_bytes": kv_cache_bytes,
          "bytes_per_token": per_token, "seconds_per_token": seconds,
          "decode_seconds": tokens * seconds}


def describe_decode(r: dict[str, float], hbm_bandwidth: float, tokens: int) -> str:
  gib = 2**30
  return (f"decode roofline: {r['weight_bytes'] / gib:.2f} GiB weights + "
          f"{r['kv_cache_bytes'] / gib:.2f} GiB KV cache read per token: >= "
          f"{r['seconds_per_token'] * 1e3:.2f} ms per token at {hbm_bandwidth / 1e9:.0f} GB/s, "
          f">= {r['decode_seconds']:.2f} s for {tokens} tokens")
