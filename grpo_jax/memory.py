"""The memory plan: micro-batches, remat and sampler chunks chosen from the compiled
programs' own memory figures against the device's memory.

Each program of a run (the sampler, the evaluator's sampler, the score pass and the update,
the latter two per compiled completion width) has a ladder of settings, fastest first:

  * update: micro-batches of the batch's rows per device, remat off, then on;
  * score (old and reference log-probs, no gradient): micro-batches of rows;
  * sampler / evaluator: the prompts of a device decoded in 1, 2, 4, ... chunks, each with
    a KV cache for its own rows.

`choose` walks a ladder: an analytic estimate (`estimate_*`, calibrated by every compile)
skips settings that cannot fit, the first one left is compiled, and XLA's
`memory_analysis()` of that program decides: the resident training state (actor, AdamW
moments, reference: in memory through every phase), the program's batch arguments, its
outputs that reuse no donated buffer, its temporaries and code, against the device's
memory (`device_memory`). The trainer runs the very program it measured
(`layouts.planned.PlannedStep`); `python -m grpo_jax.plan` walks the same ladders with the
same figures for a TPU slice (`plan.programs`), so both choose the same settings.

Settings the config gives (`micro_batch_size`, `remat`) are honoured: the ladder is just
that setting, and if it does not fit the error names one that does.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Callable, Sequence

import jax.numpy as jnp

from grpo_jax.errors import UserError
from grpo_jax.models import ModelConfig, attention

log = logging.getLogger("grpo_jax")
GiB = 2**30

# CPU: micro-batches of about this many tokens (prompt + completion) keep the train pass's
# activations in cache: the backward pass ran 1.15x (4k-token batch) to 1.6x (3.8k-token
# batch of a tiny model) faster than on the whole batch at once.
MICRO_BATCH_TOKENS = 1024
# Accelerators: micro-batches below this many tokens leave the matmul units idle; the
# ladder tries remat on larger micro-batches before remat off on smaller ones.
ACCELERATOR_MIN_TOKENS = 8192
# CPU: what the plan leaves to the rest of the process (Python, the tokenizer, TensorFlow
# under the CLU writers, host copies of rollouts, XLA's compiler) and to the machine.
CPU_HEADROOM_BYTES = 3 * GiB
CPU_HEADROOM_FRACTION = 0.15


# --- The device's memory ------------------------------------------------------------------


def available_ram() -> int:
  """Bytes of RAM available to a new allocation on this host (MemAvailable)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def device_memory(devices: Sequence[Any], limit_gib: float = 0.0) -> int:
  """Bytes per device the plan may fill: `limit_gib` where given; else `bytes_limit` of a
  GPU / TPU, or on a CPU the available RAM less headroom, shared by its devices."""
  if limit_gib:
    return int(limit_gib * GiB)
  device = devices[0]
  if device.platform == "cpu":
    ram = available_ram()
    usable = ram * (1 - CPU_HEADROOM_FRACTION) - CPU_HEADROOM_BYTES
    local = sum(1 for d in devices if d.process_index == device.process_index)
    return max(int(usable // max(local, 1)), GiB // 4)
  stats = device.memory_stats() or {}
  if "bytes_limit" not in stats:
    raise UserError(f"{device.platform} device {device.id} reports no memory limit; set "
                    "--config.memory_limit_gib to the memory of one device")
  return int(stats["bytes_limit"])


# --- What a compiled program needs ----------------------------------------------------------


def size_text(size: float) -> str:
  """'4.9 GiB', or '35 MiB' below a GiB (a tiny model's programs)."""
  return f"{size / GiB:.1f} GiB" if size >= GiB else f"{size / 2**20:.0f} MiB"


def peak_bytes(analysis, resident: int, batch_bytes: int) -> int:
  """Peak bytes per device while a compiled program runs: the resident training state (in
  memory whether the program reads it or not), its batch arguments, outputs that reuse no
  donated buffer, temporaries and code (`analysis`: its `memory_analysis()`)."""
  return (resident + batch_bytes + analysis.output_size_in_bytes
          - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes
          + analysis.generated_code_size_in_bytes)


def is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


# --- Ladders: the settings of each program, fastest first -----------------------------------


@dataclasses.dataclass(frozen=True)
class Update:
  rows: int  # per device (per data shard on a mesh) and micro-batch
  remat: bool

  def describe(self, total_rows: int) -> str:
    parts = total_rows // self.rows
    split = (f"in 1 pass of {self.rows} rows" if parts == 1 else
             f"in {parts} micro-batches of {self.rows} rows")
    return f"update {split}, remat {'on' if self.remat else 'off'}"

  def flags(self, total_rows: int) -> str:
    return (f"--config.micro_batch_size={self.rows if self.rows < total_rows else 0} "
            f"--config.remat={self.remat}")


@dataclasses.dataclass(frozen=True)
class Score:
  rows: int  # per device and pass

  def describe(self, total_rows: int) -> str:
    parts = total_rows // self.rows
    return ("score in 1 pass" if parts == 1 else
            f"score in {parts} passes of {self.rows} rows")


@dataclasses.dataclass(frozen=True)
class Chunks:
  chunks: int  # prompts of a device decoded in this many chunks

  def describe(self, total_rows: int, name: str = "sampler") -> str:
    rows = total_rows // self.chunks
    return (f"{name} on {rows} rows at once" if self.chunks == 1 else
            f"{name} in {self.chunks} chunks of {rows} rows")


def divisors(n: int) -> list[int]:
  """Divisors of n, largest first."""
  return [d for d in range(n, 0, -1) if n % d == 0]


def head_dominated(cfg: ModelConfig) -> bool:
  """The LM head / embedding holds most of the parameters (a large vocabulary on a small
  model). Each micro-batch re-runs the head's gradient over the whole vocabulary: with
  40M parameters and a 150k vocabulary, ~1k-token micro-batches ran the update 10% slower
  on CPU than the whole batch."""
  head = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
  return 2 * head > cfg.num_params()


def update_ladder(rows: int, seq_len: int, platform: str, cfg: ModelConfig,
                  micro_batch_size: int = 0, remat: bool | None = None) -> list[Update]:
  """Update settings, fastest first, for `rows` completions per device of `seq_len`
  positions. `micro_batch_size` / `remat`: the config's (0 / None: the plan's to choose).

  CPU: micro-batches of ~MICRO_BATCH_TOKENS tokens (measured fastest), or the whole batch
  for head-dominated models; smaller ones only for memory. Accelerators: the largest
  micro-batch first; below ACCELERATOR_MIN_TOKENS tokens a micro-batch with remat is
  preferred to a smaller one without. Remat only where nothing without it fits."""
  sizes = [micro_batch_size] if micro_batch_size else divisors(rows)
  if not micro_batch_size and platform == "cpu" and not head_dominated(cfg):
    fits = max(1, MICRO_BATCH_TOKENS // seq_len)
    sizes = [d for d in sizes if d <= fits]
  if platform == "cpu" or micro_batch_size:
    order = [Update(d, False) for d in sizes] + [Update(d, True) for d in sizes]
  else:
    large = [d for d in sizes if d == sizes[0] or d * seq_len >= ACCELERATOR_MIN_TOKENS]
    order = ([Update(d, False) for d in large] + [Update(d, True) for d in sizes]
             + [Update(d, False) for d in sizes if d not in large])
  return [u for u in order if remat is None or u.remat == remat]


def score_ladder(rows: int) -> list[Score]:
  return [Score(d) for d in divisors(rows)]


def chunk_ladder(prompts: int) -> list[Chunks]:
  """Sampler chunks: 1 (every row at once), then the divisors of the prompts, smallest
  first (a chunk decodes its rows to the longest one's end: more chunks, more waiting)."""
  return [Chunks(c) for c in reversed(divisors(prompts))]


# --- Analytic first guesses (calibrated by every compile) ------------------------------------


def _layer_activation_bytes(cfg: ModelConfig, tokens: int, seq_len: int) -> float:
  """Bytes a layer's forward pass over `tokens` saves for its backward pass: the
  projections' inputs and outputs, the MLP's [tokens, intermediate] buffers, and the
  attention scores (float32) and probabilities of its causal blocks where the attention
  kernel materialises them (`models.attention`: the others keep a block's at a time)."""
  item = jnp.dtype(cfg.compute_dtype).itemsize
  d, f, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads
  dense = item * (8 * d + 2 * (heads + 2 * cfg.num_kv_heads) * cfg.head_dim + 5 * f)
  kernel = attention.for_length(seq_len) if cfg.attention == "auto" else cfg.attention
  scores = (heads * min(seq_len, seq_len / 2 + attention.ATTENTION_BLOCK) * (4 + item + 1)
            if kernel == "xla" else 0)
  return tokens * (dense + scores)


def estimate_update(cfg: ModelConfig, setting: Update, total_rows: int, seq_len: int,
                    trainable_bytes: int) -> float:
  """Bytes the update adds to the resident state: the gradients (twice when accumulated
  over micro-batches) and one micro-batch's activations (every layer's, or with remat the
  layer inputs and one layer's)."""
  tokens = setting.rows * seq_len
  layer = _layer_activation_bytes(cfg, tokens, seq_len)
  item = jnp.dtype(cfg.compute_dtype).itemsize
  activations = (cfg.num_layers * tokens * cfg.hidden_size * item + 2 * layer
                 if setting.remat else cfg.num_layers * layer)
  grads = trainable_bytes * (2 if setting.rows < total_rows else 1)
  return grads + activations + 4 * 16 * 2**20


def estimate_score(cfg: ModelConfig, setting: Score, seq_len: int) -> float:
  """One layer's forward activations of a pass over `setting.rows` rows (nothing is saved)."""
  return 2 * _layer_activation_bytes(cfg, setting.rows * seq_len, seq_len) + 2 * 16 * 2**20


def estimate_sampler(cfg: ModelConfig, setting: Chunks, prompts: int, group: int,
                     prompt_len: int, length: int) -> float:
  """The KV cache of one chunk's rows, its [rows, vocabulary] logits (a few float32 copies)
  and the prefill of its prompts."""
  item = jnp.dtype(cfg.compute_dtype).itemsize
  chunk_prompts = prompts // setting.chunks
  rows = chunk_prompts * group
  cache = 2 * cfg.num_layers * rows * cfg.num_kv_heads * cfg.head_dim * (
      prompt_len + length) * item
  logits = 4 * rows * cfg.vocab_size * 4
  prefill = 2 * _layer_activation_bytes(cfg, chunk_prompts * prompt_len, prompt_len)
  outputs = 3 * rows * length * 4 * (2 if setting.chunks > 1 else 1)
  return cache + logits + prefill + outputs


# --- Choosing -----------------------------------------------------------------------------


@dataclasses.dataclass
class Choice:
  """The setting chosen (None: nothing fits), what its program needs, and every setting
  tried with its bytes (None: skipped by the estimate)."""
  setting: Any
  bytes: float
  program: Any
  tried: list[tuple[Any, float | None]]


def choose(ladder: Sequence[Any], measure: Callable[[Any], tuple[float, Any]], limit: int,
           estimate: Callable[[Any], float] | None = None) -> Choice:
  """The first setting of `ladder` whose program fits `limit` bytes.

  `measure(setting)` compiles it: (peak bytes, or inf where the compiler refused for want
  of memory; the program). `estimate(setting)`: analytic bytes, scaled by what the last
  compile measured against its estimate; a setting estimated over the limit is skipped
  unless it is the last. When a setting fits right after skipped ones, the one before it
  is compiled too if the calibrated estimate then says it may fit."""
  tried: list[tuple[Any, float | None]] = []
  scale = 1.0
  guess = (lambda s: estimate(s) * scale) if estimate else (lambda s: 0.0)
  for i, setting in enumerate(ladder):
    if i < len(ladder) - 1 and guess(setting) > limit:
      tried.append((setting, None))
      continue
    size, program = measure(setting)
    tried.append((setting, size))
    if estimate and math.isfinite(size) and estimate(setting) > 0:
      scale = size / estimate(setting)
    if size <= limit:
      if i > 0 and tried[-2][1] is None and guess(ladder[i - 1]) <= limit:
        before, before_program = measure(ladder[i - 1])  # the faster one may fit after all
        tried.insert(len(tried) - 1, (ladder[i - 1], before))
        if before <= limit:
          return Choice(ladder[i - 1], before, before_program, tried)
      return Choice(setting, size, program, tried)
  return Choice(None, math.inf, None, tried)


def too_large(name: str, asked: str, needed: float, limit: int, alternative: Choice | None,
              describe: Callable[[Any], str]) -> UserError:
  """The one-line error for a configured setting that does not fit."""
  needs = ("more than the compiler allows" if not math.isfinite(needed)
           else size_text(needed))
  instead = ("nothing smaller fits either: use a larger device or a smaller batch"
             if alternative is None or alternative.setting is None else
             f"{describe(alternative.setting)} fits ({size_text(alternative.bytes)})")
  return UserError(f"the {name} does not fit: {asked} needs {needs} of the "
                   f"{limit / GiB:.1f} GiB per device; {instead}")


def nothing_fits(name: str, choice: Choice, limit: int, hint: str) -> UserError:
  measured = [b for _, b in choice.tried if b is not None]
  least = min(measured) if measured else math.inf
  needs = f"at least {size_text(least)}" if math.isfinite(least) else "more than it has"
  return UserError(f"the {name} does not fit in {limit / GiB:.1f} GiB per device even at its "
                   f"smallest setting ({needs}); {hint}")


__all__ = ["GiB", "MICRO_BATCH_TOKENS", "available_ram", "device_memory", "peak_bytes",
           "Update", "Score", "Chunks", "update_ladder", "score_ladder",
           "chunk_ladder", "estimate_update", "estimate_score", "estimate_sampler", "Choice",
           "choose", "too_large", "nothing_fits"]
