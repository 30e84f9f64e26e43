"""Chat prompts: render messages with the tokenizer's chat template, TRL-style.

A prompt is *conversational* when it is a list of {"role", "content"} messages. Such
prompts are rendered with the tokenizer's chat template (with the generation prompt), and
the reward functions then receive completions in TRL's conversational format:
`[{"role": "assistant", "content": text}]`. Plain-text prompts are rendered with the chat
template too when the tokenizer has one (`chat_template="auto"`), wrapped as one user
message (after `system_prompt`, if set); their completions stay plain strings.
"""

from __future__ import annotations

from typing import Any

from grpo_jax.errors import UserError

CHAT_TEMPLATE_MODES = ("auto", "none")


def is_conversational(prompt: Any) -> bool:
  return (isinstance(prompt, (list, tuple)) and bool(prompt)
          and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt))


def _messages(prompt, system_prompt: str) -> list[dict[str, str]]:
  messages = list(prompt) if is_conversational(prompt) else [{"role": "user",
                                                               "content": str(prompt)}]
  if system_prompt and messages[0]["role"] != "system":
    messages = [{"role": "system", "content": system_prompt}] + messages
  return messages


def render_prompts(tokenizer, prompts: list, *, system_prompt: str = "",
                   mode: str = "auto", tools: list[dict] | None = None) -> tuple[list[str], bool]:
  """(prompt texts, whether the tokenizer should still add its special tokens).

  Rendered templates already hold BOS and role markers, so no special tokens are added.
  `tools`: JSON schemas of the tools the model may call, for the template to show it.
  """
  if mode not in CHAT_TEMPLATE_MODES:
    raise UserError(f"chat_template={mode!r}; allowed: {', '.join(CHAT_TEMPLATE_MODES)}")
  has_template = getattr(tokenizer, "chat_template", None) is not None
  conversational = any(is_conversational(p) for p in prompts)
  if conversational and not has_template:
    raise UserError("the prompts are chat messages but the tokenizer has no chat template; "
                    "use a model whose tokenizer has one, or plain-text prompts")
  if conversational and mode == "none":
    raise UserError("the prompts are chat messages, which need chat_template='auto'")
  if not (has_template and mode == "auto"):
    if system_prompt:
      raise UserError("system_prompt needs a tokenizer with a chat template "
                      "(and chat_template='auto')")
    return [str(p) for p in prompts], True
  extra = {"tools": tools} if tools else {}
  texts = [tokenizer.apply_chat_template(_messages(p, system_prompt), tokenize=False,
                                         add_generation_prompt=True, **extra) for p in prompts]
  return texts, False


def completions_for_rewards(prompts: list, completions: list[str]) -> list:
  """TRL's format: conversational prompts get conversational completions."""
  if prompts and is_conversational(prompts[0]):
    return [[{"role": "assistant", "content": text}] for text in completions]
  return completions
