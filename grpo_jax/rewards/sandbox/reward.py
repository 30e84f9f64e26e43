"""code_execution_reward's side of the sandbox: the kinds of containment events, the limits,
the result, the once-per-kind warnings, and the reward itself (code and tests). How a program
runs: grpo_jax/rewards/sandbox/__init__.py (the overview) and runner.py."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import threading
from typing import Any

from grpo_jax.errors import UserError

logger = logging.getLogger("grpo_jax")

# Kinds of containment events (ExecutionResult.kind), each warned once per process.
WALL_TIMEOUT = "wall timeout"
CPU_LIMIT = "cpu limit"
MEMORY_LIMIT = "memory limit"
OUTPUT_CAP = "output cap"
BLOCKED_NETWORK = "blocked network"
PROCESS_LIMIT = "process limit"
BLOCKED_SIGNAL = "blocked signal"
FORBIDDEN_CALL = "forbidden call"
FILE_LIMIT = "file limit"
CRASHED = "crashed"
EXITED_EARLY = "exited early"
SANDBOX_ERROR = "sandbox error"


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
  cpu_seconds: int = 5
  memory_bytes: int = 512 * 2**20  # RLIMIT_AS of each process
  wall_seconds: float = 10.0
  output_bytes: int = 64 * 2**10  # kept of stdout and of stderr; more kills the program
  max_processes: int = 4  # tasks (processes and threads) of the sandbox at once
  file_bytes: int = 2**20  # RLIMIT_FSIZE
  workdir_bytes: int = 16 * 2**20  # the tmpfs work directory (namespace modes)


DEFAULT_LIMITS = SandboxLimits()


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
  passed: int
  total: int
  kind: str | None  # None: ran to the end within its limits
  stdout: str
  stderr: str

  @property
  def reward(self) -> float:
    if self.kind is not None or self.total == 0:
      return 0.0
    return self.passed / self.total


_MESSAGES = {
    WALL_TIMEOUT: "a program exceeded its wall time ({wall} s): killed",
    CPU_LIMIT: "a program exceeded its CPU time ({cpu} s): killed",
    MEMORY_LIMIT: "a program ran out of its memory limit ({mem} MiB)",
    OUTPUT_CAP: "a program printed more than {out} bytes: killed",
    BLOCKED_NETWORK: "a program tried to use the network: refused",
    PROCESS_LIMIT: "a program exceeded its process limit ({nproc} tasks)",
    BLOCKED_SIGNAL: "a program tried to signal a process outside its sandbox: refused",
    FORBIDDEN_CALL: "a program made a call refused without namespaces (fork/exec/ctypes)",
    FILE_LIMIT: "a program tried to write a file over {fsize} bytes",
    CRASHED: "a program died from a signal",
    EXITED_EARLY: "a program exited before its tests ran to the end",
    SANDBOX_ERROR: "the sandbox failed to run a program",
}
_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(kind: str, limits: SandboxLimits, detail: str = "") -> None:
  with _warned_lock:
    if kind in _warned:
      return
    _warned.add(kind)
  message = _MESSAGES[kind].format(wall=limits.wall_seconds, cpu=limits.cpu_seconds,
                                   mem=limits.memory_bytes // 2**20, out=limits.output_bytes,
                                   nproc=limits.max_processes, fsize=limits.file_bytes)
  logger.warning("code_execution_reward: %s, reward 0%s (warned once per kind)", message,
                 f" [{detail}]" if detail else "")


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
  from grpo_jax.rewards.builtin import completion_text  # lazy: builtin imports this module
  from grpo_jax.rewards.sandbox.runner import run_tests  # lazy: runner imports this module
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
