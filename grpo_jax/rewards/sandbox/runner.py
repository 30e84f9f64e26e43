"""The sandbox's trainer side: the isolation mode (probed once), and running one program
(`run_tests`): the temp directory with the driver (child.py) and its payload, the `unshare`
prefix and the mounts to keep/hide, reading the outputs under the caps and the wall time,
killing the group, and classifying the outcome. The overview: the package docstring
(grpo_jax/rewards/sandbox/__init__.py)."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Sequence

from grpo_jax.rewards.sandbox.types import (BLOCKED_NETWORK, BLOCKED_SIGNAL, CPU_LIMIT,
                                             CRASHED, DEFAULT_LIMITS, EXITED_EARLY, FILE_LIMIT,
                                             FORBIDDEN_CALL, MEMORY_LIMIT, OUTPUT_CAP,
                                             PROCESS_LIMIT, SANDBOX_ERROR, WALL_TIMEOUT,
                                             ExecutionResult, SandboxLimits, _warn_once)

logger = logging.getLogger("grpo_jax")

# The program that runs inside the sandbox, written into each run's temp directory as
# driver.py (child.py is never imported: it runs under `python -I -S`, stdlib only).
_DRIVER = pathlib.Path(__file__).with_name("child.py").read_text(encoding="utf-8")

_SYSTEM_DIRS = ("/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/opt",
                "/proc", "/run", "/sbin", "/sys", "/tmp", "/usr", "/var")


def _unshare_binary() -> str | None:
  return shutil.which("unshare") or next(
      (p for p in ("/usr/bin/unshare", "/bin/unshare") if os.access(p, os.X_OK)), None)


def _python() -> str:
  return os.path.realpath(sys.executable)


def _prefix(mode: str) -> list[str]:
  if mode == "none":
    return []
  user = ["--user", "--map-root-user"] if mode == "userns" else []
  return [_unshare_binary(), *user, "--mount", "--propagation", "private", "--net", "--pid",
          "--fork", "--kill-child", "--mount-proc"]


def _keep_and_hide(mode: str) -> tuple[list[str], list[str]]:
  """Directories the sandbox must still see (the Python installation) and the ones it gets
  empty tmpfs mounts over (the trainer's cwd and home, and any non-traversable ancestor of
  the installation, e.g. /root, when the worker runs as another uid)."""
  keep = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix,
                                               os.path.dirname(_python()))})
  hide = {os.path.realpath(os.getcwd()), os.path.realpath(os.path.expanduser("~"))}
  if mode == "root":
    hide.add("/root")
    for path in keep:
      parts = path.split("/")
      for depth in range(2, len(parts) + 1):
        ancestor = "/".join(parts[:depth])
        try:
          if not os.stat(ancestor).st_mode & 0o001:
            hide.add(ancestor)
            break
        except OSError:
          break
  hide = {h for h in hide if h not in _SYSTEM_DIRS and os.path.isdir(h)}
  # Other programs' temporary files: the work directory is mounted back (empty) in /tmp.
  hide |= {d for d in ("/tmp", "/var/tmp", "/dev/shm", tempfile.gettempdir()) if os.path.isdir(d)}
  # Outermost first; one inside another hidden directory is hidden already.
  ordered = []
  for h in sorted(hide, key=len):
    if not any(h.startswith(o.rstrip("/") + "/") for o in ordered):
      ordered.append(h)
  return keep, ordered


_mode_lock = threading.Lock()
_force_mode: tuple[str, bool] | None = None  # tests: run a given (mode, mounts)


@functools.cache
def _probe() -> tuple[str, bool]:
  candidates = []
  if sys.platform.startswith("linux") and _unshare_binary():
    candidates = [("root", True), ("root", False)] if os.geteuid() == 0 else []
    candidates += [("userns", True), ("userns", False)]
  for mode, mounts in candidates:
    result = _run(mode, mounts, "import fractions\nx = fractions.Fraction(1, 2)",
                  ["assert x * 2 == 1"], DEFAULT_LIMITS, warn=False)
    if result.kind is None and result.passed == 1:
      if not mounts:
        logger.warning("code_execution_reward: no private mount setup here: sandboxed programs "
                       "can read and write what their uid can outside the work directory "
                       "(warned once)")
      if mode == "userns" and os.geteuid() == 0:
        logger.warning("code_execution_reward: running as root without the root sandbox: "
                       "RLIMIT_NPROC does not bind uid 0, so a fork bomb is stopped only by "
                       "the wall timeout (warned once)")
      return mode, mounts
  logger.warning("code_execution_reward: no working `unshare` (Linux namespaces) here: "
                 "programs run without PID/network/mount isolation, guarded only by rlimits, "
                 "a session, a temp directory and an audit hook (no fork, exec, sockets, "
                 "ctypes); they can read and write what this user can (warned once)")
  return "none", False


def sandbox_mode() -> tuple[str, bool]:
  """(mode, mounts): "root", "userns" or "none" (see grpo_jax.rewards.sandbox), and whether the
  read-only mount setup works. Probed once per process."""
  if _force_mode is not None:
    return _force_mode
  with _mode_lock:
    return _probe()


def run_tests(code: str, tests: Sequence[str], limits: SandboxLimits = DEFAULT_LIMITS
              ) -> ExecutionResult:
  """Run `code` once, then each test snippet in its namespace, in the sandbox."""
  mode, mounts = sandbox_mode()
  return _run(mode, mounts, code, list(tests), limits)


def _run(mode: str, mounts: bool, code: str, tests: list[str], limits: SandboxLimits,
         warn: bool = True) -> ExecutionResult:
  tmpdir = tempfile.mkdtemp(prefix="grpo_sandbox_")
  uid = secrets.randbelow(2**30) + 2**30 if mode == "root" else None
  keep, hide = _keep_and_hide(mode)
  nproc = limits.max_processes + (2 if mode == "userns" else 0)
  config = {"mode": mode, "mounts": mounts, "workdir": tmpdir, "uid": uid, "keep": keep,
            "hide": hide, "nproc": nproc, "limits": dataclasses.asdict(limits)}
  driver, payload = os.path.join(tmpdir, "driver.py"), os.path.join(tmpdir, "payload.json")
  with open(driver, "w") as f:
    f.write(_DRIVER)
  with open(payload, "w") as f:
    json.dump({"config": config, "code": code, "tests": tests}, f)
  env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": tmpdir, "TMPDIR": tmpdir,
         "LANG": "C.UTF-8"}
  reader, writer = os.pipe()
  try:
    proc = subprocess.Popen([*_prefix(mode), _python(), "-I", "-S", driver, str(writer), payload],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, pass_fds=(writer,), cwd=tmpdir, env=env,
                            start_new_session=True)
  except BaseException:
    os.close(reader)
    os.close(writer)
    shutil.rmtree(tmpdir, ignore_errors=True)
    raise
  os.close(writer)
  try:
    nonce = secrets.token_hex(16)
    try:
      proc.stdin.write((nonce + "\n").encode())
      proc.stdin.close()
    except OSError:
      pass
    killed, outputs = _collect(proc, reader, limits)
  finally:
    _kill(proc, uid)
    os.close(reader)
    for stream in (proc.stdout, proc.stderr):
      stream.close()
    shutil.rmtree(tmpdir, ignore_errors=True)
  stdout, stderr, result_data = outputs
  report_json = _report(result_data, nonce)
  kind, detail = _classify(killed, report_json, limits)
  if kind is not None and warn:
    _warn_once(kind, limits, detail)
  passed = (report_json or {}).get("passed") or 0
  total = len(tests)
  return ExecutionResult(passed=min(passed, total), total=total, kind=kind,
                         stdout=stdout.decode("utf-8", "replace"),
                         stderr=stderr.decode("utf-8", "replace"))


def _collect(proc: subprocess.Popen, reader: int, limits: SandboxLimits):
  """Read stdout, stderr and the result pipe until all close or a limit is hit."""
  kept = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(),
          reader: bytearray()}
  caps = {proc.stdout.fileno(): limits.output_bytes, proc.stderr.fileno(): limits.output_bytes,
          reader: 2**20}
  deadline = time.monotonic() + limits.wall_seconds
  killed = None
  with selectors.DefaultSelector() as selector:
    for fd in kept:
      selector.register(fd, selectors.EVENT_READ)
    while selector.get_map() and killed is None:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        killed = WALL_TIMEOUT
        break
      for key, _ in selector.select(remaining):
        chunk = os.read(key.fd, 65536)
        if not chunk:
          selector.unregister(key.fd)
          continue
        room = caps[key.fd] - len(kept[key.fd])
        kept[key.fd].extend(chunk[:max(room, 0)])
        if len(chunk) > room and key.fd != reader:
          killed = OUTPUT_CAP
          break
  out, err = bytes(kept[proc.stdout.fileno()]), bytes(kept[proc.stderr.fileno()])
  return killed, (out, err, bytes(kept[reader]))


def _kill(proc: subprocess.Popen, uid: int | None) -> None:
  """SIGKILL the session's process group (and, as root, every process of the sandbox uid)."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  if uid is not None:
    for entry in os.listdir("/proc"):
      if entry.isdigit():
        try:
          with open(f"/proc/{entry}/status") as f:
            uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
          if str(uid) in uids:
            os.kill(int(entry), signal.SIGKILL)
        except (OSError, StopIteration, ValueError):
          pass
  proc.wait()


def _report(data: bytes, nonce: str) -> dict | None:
  prefix = (nonce + " ").encode()
  for line in data.splitlines():
    if line.startswith(prefix):
      try:
        report = json.loads(line[len(prefix):])
      except ValueError:
        return None
      return report if isinstance(report, dict) else None
  return None


_FLAG_ORDER = (MEMORY_LIMIT, PROCESS_LIMIT, FILE_LIMIT, BLOCKED_NETWORK, BLOCKED_SIGNAL,
               FORBIDDEN_CALL)


def _classify(killed: str | None, report: dict | None, limits: SandboxLimits
              ) -> tuple[str | None, str]:
  if killed is not None:
    return killed, ""
  if report is None:
    return SANDBOX_ERROR, "no result from the driver"
  if report.get("error"):
    return SANDBOX_ERROR, str(report["error"])[:300]
  status, flags = report.get("status"), set(report.get("flags") or ())
  if isinstance(status, int) and os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL
                                 and report.get("cpu", 0) >= limits.cpu_seconds - 0.05):
      return CPU_LIMIT, ""
    if sig == signal.SIGXFSZ:
      return FILE_LIMIT, ""
    if MEMORY_LIMIT in flags:
      return MEMORY_LIMIT, ""
    return CRASHED, signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
  for kind in _FLAG_ORDER:
    if kind in flags:
      return kind, ""
  if report.get("passed") is None:
    return EXITED_EARLY, ""
  return None, ""
