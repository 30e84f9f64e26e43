"""Tools and environments by import path (TRL's `tools` and `environment_factory`).

A tool is a Python callable with type hints and a Google-style docstring; its JSON schema
(transformers' `get_json_schema`) is what the chat template shows the model. An
environment is a class: one instance per completion, `reset(**row)` before the rollout,
its public methods (all but `reset`) the completion's tools, and the instances handed to
the reward functions (`environments=`) after it.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Sequence

from grpo_jax.errors import UserError
from grpo_jax.rewards.registry import load_callable
from grpo_jax.tools.builtin import BUILTIN_TOOLS


@dataclasses.dataclass(frozen=True)
class Tool:
  name: str
  function: Callable[..., Any]
  schema: dict[str, Any]  # {"type": "function", "function": {"name", "description", ...}}


def as_tool(function: Callable[..., Any], where: str = "") -> Tool:
  """A Tool with its schema; a UserError (naming the tool) if the schema can't be built."""
  from transformers.utils import get_json_schema  # noqa: PLC0415 (heavy import)
  name = getattr(function, "__name__", type(function).__name__)
  try:
    schema = get_json_schema(function)
  except Exception as e:  # TypeHintParsingException, DocstringParsingException, ...
    raise UserError(f"tool {where or name!r} has no usable JSON schema ({type(e).__name__}: "
                    f"{e}); give it type hints and a docstring with an Args: section") from e
  return Tool(name, function, schema)


def load_tools(specs: str | Sequence[str | Callable]) -> list[Tool]:
  """The `tools` field: a comma-separated string or a list of built-in names (BUILTIN_TOOLS:
  calculator), `module:function` paths or callables. Names must be unique."""
  if isinstance(specs, str):
    specs = [s.strip() for s in specs.split(",")]

  def function(spec):
    if callable(spec):
      return spec
    return BUILTIN_TOOLS[spec] if spec in BUILTIN_TOOLS else load_callable(spec, "tool")

  tools = [as_tool(function(s), "" if callable(s) else s) for s in specs if callable(s) or s]
  _check_unique([t.name for t in tools], "tools")
  return tools


def _check_unique(names: list[str], where: str) -> None:
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise UserError(f"{where} has several tools named {', '.join(duplicates)}; the model "
                    "calls tools by name, rename one")


class Environments:
  """`environment_factory`: a class (or factory) whose instances are per-completion state."""

  def __init__(self, spec: str | Callable):
    self.spec = spec if isinstance(spec, str) else getattr(spec, "__name__", repr(spec))
    self.factory = load_callable(spec, "environment_factory") if isinstance(spec, str) else spec
    probe = self._new()
    if not callable(getattr(probe, "reset", None)):
      raise UserError(f"environment_factory {self.spec!r} makes {type(probe).__name__} objects "
                      "without a reset(**row) method")
    self.method_names = [name for name, _ in inspect.getmembers(probe, callable)
                         if not name.startswith("_") and name != "reset"]
    if not self.method_names:
      raise UserError(f"environment_factory {self.spec!r}: {type(probe).__name__} has no public "
                      "method besides reset; its public methods are the model's tools")
    self.schemas = [as_tool(getattr(probe, n), f"{self.spec}.{n}").schema
                    for n in self.method_names]

  def _new(self):
    try:
      return self.factory()
    except Exception as e:
      raise UserError(f"environment_factory {self.spec!r} raised {type(e).__name__}: {e}") from e

  def start(self, rows: list[dict[str, Any]]) -> list[Any]:
    """One fresh, reset instance per row (a row: the completion's dataset columns)."""
    instances = []
    for row in rows:
      env = self._new()
      try:
        env.reset(**row)
      except Exception as e:
        raise UserError(f"environment_factory {self.spec!r}: reset(**row) raised "
                        f"{type(e).__name__}: {e} (row columns: {', '.join(row)})") from e
      instances.append(env)
    return instances

  def tools_of(self, env) -> dict[str, Callable]:
    return {name: getattr(env, name) for name in self.method_names}


def tool_schemas(tools: Sequence[Tool], environments: Environments | None) -> list[dict]:
  """What the chat template gets as `tools=`: plain tools, then the environment's methods."""
  schemas = [t.schema for t in tools] + (environments.schemas if environments else [])
  _check_unique([s["function"]["name"] for s in schemas], "tools + environment methods")
  return schemas
