"""Built-in rule rewards, with TRL's reward-function signature.

`fn(prompts, completions, **columns) -> list[float | None]`: `columns` are the dataset's
other columns, one entry per completion (e.g. `answer=[...]`), and `completion_ids` (each
completion's token ids up to and including its EOS, as TRL passes them); unknown ones are
ignored. Completions are strings or TRL's conversational form (a list of messages).

BUILTIN_REWARDS are plain functions; CONFIGURED_REWARDS are built from run options
(`resolve_reward_funcs(..., builtin_options=...)`), e.g. soft_overlong_punishment from
max_completion_length and soft_punish_cache.
"""

from __future__ import annotations

import decimal
import re
from typing import Any

from grpo_jax.errors import UserError
from grpo_jax.rewards.sandbox import code_execution_reward
from grpo_jax.rewards.text import completion_text

# A number: optional minus (not a subtraction like "7-2": no digit, letter or dot just
# before it), thousands groups "1,234" or plain digits, optional decimals, or ".5".
NUMBER = r"(?:(?<![\w.])-)?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(NUMBER)
_HASHES_RE = re.compile(r"####\s*(" + NUMBER + ")")
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")
# A final "#### N" with nothing but whitespace after it (the reasoning is checked apart, to
# keep the regex linear on long completions).
_FINAL_ANSWER_RE = re.compile(r"####[ \t]*" + NUMBER + r"\s*\Z")
_REASONING_RE = re.compile(r"[^\s#]")


def normalize_number(number: str) -> str | None:
  """Canonical form, so "1,234" == "1234", "-3.50" == "-3.5", "7.0" == "7"."""
  try:
    value = decimal.Decimal(number.replace(",", ""))
  except decimal.InvalidOperation:
    return None
  if value == value.to_integral_value():
    return str(int(value))
  return format(value.normalize(), "f")


def extract_final_number(text: str) -> str | None:
  """The final answer: from "#### N" (GSM8K), else `\\boxed{N}`, else the last number."""
  for pattern in (_HASHES_RE, _BOXED_RE):
    matches = pattern.findall(text)
    if matches:
      numbers = _NUMBER_RE.findall(matches[-1])
      if numbers:
        return normalize_number(numbers[-1])
  numbers = _NUMBER_RE.findall(text)
  return normalize_number(numbers[-1]) if numbers else None


def correctness_reward(prompts: list[str], completions: list[Any], answer: list[Any] | None = None,
                       **kwargs) -> list[float | None]:
  """1.0 when the completion's final number equals the `answer` column's, else 0.0.

  The answer may be a bare number or a GSM8K solution ending in "#### N". None (not
  applicable) for rows without an answer or whose answer holds no number.
  """
  del prompts, kwargs
  if answer is None:
    raise UserError("correctness_reward needs an 'answer' column in the dataset")
  return [_score_answer(completion_text(c), a) for c, a in zip(completions, answer, strict=True)]


def _score_answer(text: str, answer: Any) -> float | None:
  expected = None if answer is None else extract_final_number(str(answer))
  if expected is None:
    return None
  return float(extract_final_number(text) == expected)


def format_reward(prompts: list[str], completions: list[Any], **kwargs) -> list[float]:
  """1.0 for reasoning followed by a final "#### N"; a bare "#### N" (a guess) scores 0."""
  del prompts, kwargs
  return [float(_has_format(completion_text(c))) for c in completions]


def _has_format(text: str) -> bool:
  """Reasoning (some character other than space or '#') before a final "#### N"."""
  final = _FINAL_ANSWER_RE.search(text)
  return final is not None and _REASONING_RE.search(text, 0, final.start()) is not None


class SoftOverlongPunishment:
  """DAPO's soft overlong punishment (Eq. 13 of arXiv:2503.14476; TRL's
  `get_soft_overlong_punishment`), on the completion's length |y| in tokens, EOS included:

    0                                  |y| <= L - C
    ((L - C) - |y|) / C                L - C < |y| <= L
    -1                                 L < |y|

  L = max_completion_length, C = soft_punish_cache. It counts tokens, not characters: a
  completion that hit the length limit gets exactly -1 whatever its text.
  """

  # The metric name (rewards/<name>/mean): TRL's, so the curves compare with TRL runs.
  __name__ = "soft_overlong_punishment_reward"

  def __init__(self, max_completion_length: int, soft_punish_cache: int):
    if not 0 <= soft_punish_cache <= max_completion_length:
      raise UserError(f"soft_punish_cache={soft_punish_cache}; allowed: 0 <= x <= "
                      f"max_completion_length={max_completion_length}")
    self.max_completion_length = max_completion_length
    self.soft_punish_cache = soft_punish_cache

  def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    del prompts, kwargs
    if completion_ids is None:
      raise UserError("soft_overlong_punishment needs completion_ids (the completions' token "
                      "ids), which the trainer passes to every reward function")
    if len(completion_ids) != len(completions):
      raise UserError(f"soft_overlong_punishment got {len(completion_ids)} completion_ids for "
                      f"{len(completions)} completions")
    return [self.punishment(len(ids)) for ids in completion_ids]

  def punishment(self, length: int) -> float:
    limit, cache = self.max_completion_length, self.soft_punish_cache
    if length <= limit - cache:
      return 0.0
    if length <= limit:
      return (limit - cache - length) / cache
    return -1.0


def soft_overlong_punishment(max_completion_length: int, soft_punish_cache: int = 0
                             ) -> SoftOverlongPunishment:
  """The reward for a run's options; soft_punish_cache 0 means a fifth of
  max_completion_length (DAPO's 4,096 of 20,480 tokens)."""
  cache = soft_punish_cache or max_completion_length // 5
  return SoftOverlongPunishment(max_completion_length, cache)


BUILTIN_REWARDS = {fn.__name__: fn for fn in (correctness_reward, format_reward,
                                              code_execution_reward)}
# Built-in name -> (factory, the builtin_options it takes: required, then optional).
CONFIGURED_REWARDS = {
    "soft_overlong_punishment": (soft_overlong_punishment, ("max_completion_length",),
                                 ("soft_punish_cache",)),
}
