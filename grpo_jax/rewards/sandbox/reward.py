"""code_execution_reward: the code of a completion and the tests of its row, run in the
sandbox (`runner.run_tests`). What both sides share (kinds, limits, results, warnings):
`types`. How a program runs: grpo_jax/rewards/sandbox/__init__.py (the overview) and
runner.py."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
from typing import Any

from grpo_jax.errors import UserError
from grpo_jax.rewards.sandbox.runner import run_tests
from grpo_jax.rewards.text import completion_text

logger = logging.getLogger("grpo_jax")

# --- code and tests ----------------------------------------------------------------------

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = ("", "python", "py", "python3", "py3")


def extract_code(text: str) -> str | None:
  """The code of the last fenced Python (or untagged) block, or None without one."""
  blocks = [m.group(2) for m in _FENCE_RE.finditer(text) if m.group(1).lower() in _PYTHON_TAGS]
  return blocks[-1] if blocks else None


def parse_tests(tests: Any) -> list[str] | None:
  """A row's tests: a list of snippets, or a string holding such a list as JSON (any other
  string is one test). None or an empty list: not applicable."""
  if tests is None:
    return None
  if isinstance(tests, str):
    try:
      decoded = json.loads(tests)
    except ValueError:
      decoded = [tests]
    tests = decoded if isinstance(decoded, list) else [tests]
  if not isinstance(tests, (list, tuple)) or not all(isinstance(t, str) for t in tests):
    raise UserError(f"code_execution_reward: a 'tests' entry of type {type(tests).__name__}; "
                    "expected a list of Python snippets like ['assert f(2) == 4'] or its JSON")
  return list(tests) or None


def code_execution_reward(prompts: list[Any], completions: list[Any],
                          tests: list[Any] | None = None, **kwargs) -> list[float | None]:
  """passed / len(tests) for each completion's last fenced Python block, run sandboxed
  (see grpo_jax.rewards.sandbox's docstring); 0.0 without a block, None for rows without
  tests."""
  del prompts, kwargs
  if tests is None:
    return [None] * len(completions)
  if len(tests) != len(completions):
    raise UserError(f"code_execution_reward got {len(tests)} tests for {len(completions)} "
                    "completions")
  jobs = [(extract_code(completion_text(c)), parse_tests(t)) for c, t in zip(completions, tests)]
  rewards: list[float | None] = [None if t is None else 0.0 for _, t in jobs]
  todo = [i for i, (code, t) in enumerate(jobs) if code is not None and t is not None]
  if todo:
    workers = min(len(todo), os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
      results = pool.map(lambda i: run_tests(jobs[i][0], jobs[i][1]), todo)
      for i, result in zip(todo, results):
        rewards[i] = result.reward
  return rewards
