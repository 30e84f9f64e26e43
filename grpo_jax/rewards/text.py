"""A completion's text, as every reward reads it: a string, or TRL's conversational form
(a list of messages, whose text parts count)."""

from __future__ import annotations

from typing import Any

from grpo_jax.errors import UserError


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
