"""The smollm2 workload's reward: is the completion's final number the problem's answer?

benchmarks/compare.py copies this file beside the workload's files as `bench_reward.py`,
which grpo_jax, TRL and Tunix all import, so the three score with the same code. It is
self-contained (the peers' venvs cannot import grpo_jax): a transcription of
`grpo_jax.rewards.builtin.correctness_reward`, the SmolLM2 recipe's correctness reward, with
the same number pattern and the same "#### N", then \\boxed{N}, then last-number order.
"""

from __future__ import annotations

import decimal
import re

# A number: optional minus (not a subtraction like "7-2": no digit, letter or dot just
# before it), thousands groups "1,234" or plain digits, optional decimals, or ".5".
NUMBER = r"(?:(?<![\w.])-)?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(NUMBER)
_HASHES_RE = re.compile(r"####\s*(" + NUMBER + ")")
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")


def completion_text(completion) -> str:
  """A completion's text: a string, or a list of chat messages (their contents joined)."""
  if isinstance(completion, str):
    return completion
  if isinstance(completion, dict):
    content = completion.get("content", "")
    if isinstance(content, str):
      return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))
  return "\n".join(completion_text(message) for message in completion)


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
  """The final answer: from "#### N" (GSM8K), else \\boxed{N}, else the last number."""
  for pattern in (_HASHES_RE, _BOXED_RE):
    matches = pattern.findall(text)
    if matches:
      numbers = _NUMBER_RE.findall(matches[-1])
      if numbers:
        return normalize_number(numbers[-1])
  numbers = _NUMBER_RE.findall(text)
  return normalize_number(numbers[-1]) if numbers else None


def correctness(prompts, completions, answer=None, **kwargs) -> list[float]:
  """1.0 where the completion's final number equals its row's `answer` ("#### N"), else 0.0.

  `answer` is the dataset's column, one entry per completion: TRL and grpo_jax pass extra
  columns as keyword arguments, Tunix the extra keys of its training batch. Other keyword
  arguments (completion_ids, Tunix's mode, ...) are ignored.
  """
  del prompts, kwargs
  if answer is None:
    raise ValueError("the correctness reward needs the dataset's 'answer' column")
  scores = []
  for completion, expected in zip(completions, answer, strict=True):
    target = extract_final_number(str(expected))
    if target is None:
      raise ValueError(f"answer {expected!r} holds no number")
    scores.append(float(extract_final_number(completion_text(completion)) == target))
  return scores
