"""The LoRA adapters' settings (`LoraConfig`): what `lora.*` fields name, checked once.

A room of its own so the model (`models.transformer`, whose projections read it) and the
adapter functions (`models.lora`, which build that model) both import it without
importing each other.
"""

from __future__ import annotations

import dataclasses

from grpo_jax.errors import ConfigError
from grpo_jax.models.quantize import BASE_QUANTIZATIONS

# Our projection names (Hugging Face's): what `target_modules` may list.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every projection of the blocks (not the LM head)
BASE_DTYPES = ("float32", "bfloat16")


def target_modules(spec) -> tuple[str, ...]:
  """`lora.target_modules` ("all-linear", a comma-separated string or a sequence of
  projection names) as a tuple in PROJECTIONS order; unknown names are an error."""
  if isinstance(spec, str):
    if spec.strip() == ALL_LINEAR:
      return PROJECTIONS
    spec = spec.split(",")
  names = [str(s).strip() for s in spec if str(s).strip()]
  unknown = [n for n in names if n not in PROJECTIONS]
  if unknown or not names:
    raise ConfigError(f"lora.target_modules={spec!r}; allowed: {ALL_LINEAR!r} or projection "
                      f"names from {', '.join(PROJECTIONS)}")
  return tuple(p for p in PROJECTIONS if p in names)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """The adapters of a LoRA model (hashable: part of the static ModelConfig)."""

  rank: int
  alpha: float = 8.0
  dropout: float = 0.0
  targets: tuple[str, ...] = PROJECTIONS

  def __post_init__(self):
    if self.rank < 1:
      raise ConfigError(f"lora.rank={self.rank}; must be >= 1 (0 turns LoRA off)")
    if self.alpha <= 0:
      raise ConfigError(f"lora.alpha={self.alpha}; must be > 0")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"lora.dropout={self.dropout}; allowed: 0 <= x < 1")
    target_modules(self.targets)

  @property
  def scale(self) -> float:
    """PEFT's `scaling` (alpha / r; rsLoRA is not built)."""
    return self.alpha / self.rank


def from_config(lora) -> LoraConfig | None:
  """The run config's `lora` group as a LoraConfig, or None when rank is 0 (off)."""
  if int(lora.rank) == 0:
    return None
  if lora.base_dtype not in BASE_DTYPES:
    raise ConfigError(f"lora.base_dtype={lora.base_dtype!r}; allowed: {', '.join(BASE_DTYPES)}")
  if lora.base_quantization not in BASE_QUANTIZATIONS:
    raise ConfigError(f"lora.base_quantization={lora.base_quantization!r}; allowed: "
                      f"{', '.join(BASE_QUANTIZATIONS)}")
  return LoraConfig(rank=int(lora.rank), alpha=float(lora.alpha), dropout=float(lora.dropout),
                    targets=target_modules(lora.target_modules))
