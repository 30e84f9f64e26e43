"""Tool calls: parsed from the text of a model turn, run with a timeout.

Formats (`tool_call_format`):
  hermes   Qwen2.5, Qwen3, SmolLM2, Hermes: `<tool_call>{"name": ..., "arguments": {...}}
           </tool_call>` blocks (several per turn; a block may hold a JSON list of calls)
  llama3   Llama 3.1-3.3 JSON tool calling: the whole turn is `{"name": ..., "parameters":
           {...}}` (optionally after `<|python_tag|>`; several separated by ";")
  auto     hermes if the chat template mentions <tool_call>, llama3 if it has the ipython
           role, else hermes
  module:function  a hook: text -> list of {"name": str, "arguments": dict} (or ToolCall)

A call that does not parse is still a call: it fails, and the model reads why (as with a
call of an unknown tool, wrong arguments, an exception, or a timeout), the way TRL reports
tool errors. Nothing a tool does can stop the run.
"""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any, Callable, NamedTuple

from grpo_jax.errors import UserError
from grpo_jax.rewards.registry import load_callable

FORMATS = ("auto", "hermes", "llama3")
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


class ToolCall(NamedTuple):
  name: str
  arguments: dict[str, Any]
  error: str = ""  # set when the call could not be read: it fails with this message


class ToolResult(NamedTuple):
  name: str
  content: str
  failed: bool


def _from_json(payload: Any) -> list[ToolCall]:
  items = payload if isinstance(payload, list) else [payload]
  calls = []
  for item in items:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
      calls.append(ToolCall("", {}, f"a tool call needs a \"name\"; got {json.dumps(item)[:200]}"))
      continue
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
      try:
        arguments = json.loads(arguments)
      except json.JSONDecodeError:
        pass
    if not isinstance(arguments, dict):
      calls.append(ToolCall(item["name"], {}, "the arguments must be a JSON object"))
      continue
    calls.append(ToolCall(item["name"], arguments))
  return calls


def _json_or_error(text: str) -> list[ToolCall]:
  try:
    return _from_json(json.loads(text))
  except json.JSONDecodeError as e:
    return [ToolCall("", {}, f"the tool call is not valid JSON ({e.msg} at char {e.pos})")]


def parse_hermes(text: str) -> list[ToolCall]:
  return [call for block in _HERMES.findall(text) for call in _json_or_error(block)]


def parse_llama3(text: str) -> list[ToolCall]:
  body = text.replace("<|python_tag|>", "").strip()
  if not body.startswith("{"):
    return []
  parts = [p for p in (s.strip() for s in body.split(";")) if p] if ";" in body else [body]
  calls = []
  for part in parts:
    try:
      payload = json.loads(part)
    except json.JSONDecodeError:
      return []  # prose that happens to start with "{": not a call
    calls += _from_json(payload)
  return calls


def parser_for(spec: str, chat_template: str | None) -> Callable[[str], list[ToolCall]]:
  """The parser for `tool_call_format` (see the module docstring)."""
  if spec == "auto":
    template = chat_template or ""
    spec = "llama3" if ("ipython" in template and "<tool_call>" not in template) else "hermes"
  if spec == "hermes":
    return parse_hermes
  if spec == "llama3":
    return parse_llama3
  if ":" not in spec:
    raise UserError(f"config.tool_call_format={spec!r}; allowed: {', '.join(FORMATS)}, or a "
                    "module:function parser (text -> list of {'name', 'arguments'})")
  hook = load_callable(spec, "tool_call_format")

  def parse(text: str) -> list[ToolCall]:
    try:
      found = hook(text)
    except Exception as e:  # a parser bug fails the call, it does not stop the run
      return [ToolCall("", {}, f"the tool-call parser raised {type(e).__name__}: {e}")]
    return [c if isinstance(c, ToolCall) else _from_json(c)[0] for c in found or []]

  return parse


def close_tag(spec: str, chat_template: str | None) -> str:
  """The text that ends a call in this format (decoding may stop a row there): hermes's
  `</tool_call>`; llama3's calls end with the turn (EOS)."""
  return "</tool_call>" if parser_for(spec, chat_template) is parse_hermes else ""


def _as_text(value: Any) -> str:
  if isinstance(value, str):
    return value
  try:
    return json.dumps(value)
  except (TypeError, ValueError):
    return str(value)


class _Call(threading.Thread):
  """One tool call on a daemon thread: a tool that never returns cannot hold up the
  trainer's exit (a thread pool's workers are joined at exit)."""

  def __init__(self, function: Callable, arguments: dict[str, Any]):
    super().__init__(name="grpo_jax_tool", daemon=True)
    self.function, self.arguments = function, arguments
    self.value: Any = None
    self.error: BaseException | None = None

  def run(self):
    try:
      self.value = self.function(**self.arguments)
    except BaseException as e:  # noqa: BLE001: a tool's exception is its answer
      self.error = e


class ToolRunner:
  """Runs a turn's calls side by side, one thread each, within one wall-clock timeout. A
  tool that overruns is reported as timed out and left to finish in the background
  (Python threads cannot be killed: tools that may hang for good belong in a subprocess,
  as rewards.sandbox runs code)."""

  def __init__(self, timeout_seconds: float):
    self.timeout = timeout_seconds

  def run(self, calls: list[tuple[ToolCall, dict[str, Callable]]]) -> list[ToolResult]:
    """One result per (call, the tools this completion may use)."""
    started = []
    for call, tools in calls:
      if call.error:
        started.append(ToolResult(call.name, f"Error: {call.error}", True))
      elif call.name not in tools:
        started.append(ToolResult(call.name, f"Error: unknown tool {call.name!r}; available: "
                                  f"{', '.join(sorted(tools))}", True))
      else:
        thread = _Call(tools[call.name], call.arguments)
        thread.start()
        started.append(thread)
    deadline = time.monotonic() + self.timeout
    results = []
    for (call, _), thread in zip(calls, started):
      if isinstance(thread, ToolResult):
        results.append(thread)
        continue
      thread.join(max(0.0, deadline - time.monotonic()))
      if thread.is_alive():
        results.append(ToolResult(call.name, f"Error: tool {call.name!r} timed out after "
                                  f"{self.timeout:g} s", True))
      elif thread.error is not None:
        e = thread.error
        results.append(ToolResult(call.name, f"Error: {type(e).__name__}: {e}", True))
      else:
        results.append(ToolResult(call.name, _as_text(thread.value), False))
    return results
