"""What the sandbox's two sides share: the kinds of containment events, the limits, a
run's result and the once-per-kind warnings. `reward` (the reward function) and `runner`
(running a program) both import it, and not each other's internals."""

from __future__ import annotations

import dataclasses
import logging
import threading

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
