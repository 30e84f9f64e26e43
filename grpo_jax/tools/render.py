"""Tool responses as tokens, rendered by the tokenizer's own chat template.

The tokens to append after a model turn are what the template writes between the end of
an assistant message and the start of the next one when tool messages sit in between: the
assistant's end-of-turn marker, the tool messages in the template's format (Qwen's
`<tool_response>` blocks in a user turn, Llama's ipython role, ...), and the generation
prompt. They are found by rendering a conversation with a marker as the assistant's
content and taking what follows the marker, so any template that renders tool messages
works unchanged. When the model already ended its turn with EOS, the EOS text the template
would add again is left out.
"""

from __future__ import annotations

from typing import Any, Sequence

from grpo_jax.errors import UserError
from grpo_jax.tools.calls import ToolResult

_MARK = "\u2063grpo_jax_turn\u2063"  # invisible separator: no template or model writes it


class ResponseRenderer:

  def __init__(self, tokenizer, tool_schemas: Sequence[dict[str, Any]]):
    if getattr(tokenizer, "chat_template", None) is None:
      raise UserError("tools need a tokenizer with a chat template (it renders the tool "
                      "responses the model reads); this one has none")
    self.tokenizer, self.schemas = tokenizer, list(tool_schemas)
    self.eos_text = tokenizer.eos_token or ""

  def text(self, results: Sequence[ToolResult], after_eos: bool) -> str:
    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _MARK}]
    messages += [{"role": "tool", "name": r.name, "content": r.content} for r in results]
    rendered = self.tokenizer.apply_chat_template(messages, tools=self.schemas or None,
                                                  tokenize=False, add_generation_prompt=True)
    if _MARK not in rendered:
      raise UserError("the chat template drops the assistant's content; tool responses can't "
                      "be placed after it")
    suffix = rendered[rendered.rindex(_MARK) + len(_MARK):]
    if after_eos and self.eos_text and suffix.startswith(self.eos_text):
      suffix = suffix[len(self.eos_text):]
    return suffix

  def __call__(self, results: Sequence[ToolResult], after_eos: bool) -> list[int]:
    return self.tokenizer(self.text(results, after_eos), add_special_tokens=False)["input_ids"]
