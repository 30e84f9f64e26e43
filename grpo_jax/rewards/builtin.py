"""Built-in rule rewards for math answers, with TRL's reward-function signature.

`fn(prompts, completions, **columns) -> list[float | None]`: `columns` are the dataset's
other columns, one entry per completion (e.g. `answer=[...]`); unknown ones are ignored.
Completions are strings or TRL's conversational form (a list of messages).
"""

from __future__ import annotations

import decimal
import re
from typing import Any

from grpo_jax.errors import UserError

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


def completion_text(completion: Any) -> str:
  """The text of a completion: a string, or TRL's list of messages (contents joined)."""
  if isinstance(completion, str):
    return completion
  if isinstance(completion, dict):
    return _content_text(completion.get("content", ""))
  if isinstance(completion, (list, tuple)):
    return "\n".join(completion_text(message) for message in completion)
  raise UserError(f"completion of type {type(completion).__name__}; expected a string or a "
                  "list of messages like [{'role': 'assistant', 'content': '...'}]")


def _content_text(content: Any) -> str:
  """Message content: a string, or a list of parts of which the text parts count."""
  if isinstance(content, str):
    return content
  return "".join(part.get("text", "") for part in content if isinstance(part, dict))


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


BUILTIN_REWARDS = {fn.__name__: fn for fn in (correctness_reward, format_reward)}
