"""Orbax's noise when a save or restore fails, and only then, reduced to nothing: the
Checkpointer already turned that failure into one UserError line.

Orbax saves asynchronously; a disk that refuses a write fails in background threads, which
log tracebacks through absl from several threads, and leave "Exception ignored" debris of
abandoned coroutines (at the latest at interpreter exit). `install()` (called by the
command line, not at import: a library must not rewire a process it is imported into) adds
a log filter for Orbax's own records of such a failure and an unraisable hook for that
debris; every other log and report passes. The Checkpointer marks a failed operation
(`mark_failed`) and a completed save (`save_completed`).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading

from grpo_jax.checkpoint.disk import TS_OS_ERROR, WRITE_ERRNOS, exception_chain, write_errno

# Set once the disk refused one of Orbax's writes, or a restore failed, in this process: from
# then on the debris of that operation is not printed (see _quiet_unraisable).
_ORBAX_OPERATION_FAILED = threading.Event()


def _refused_write(record: logging.LogRecord) -> bool:
  exc = record.exc_info[1] if record.exc_info else None
  if exc is not None and write_errno(exc) is not None:
    return True
  try:
    message = record.getMessage()
  except Exception:  # pylint: disable=broad-except
    return False
  code = TS_OS_ERROR.search(message)
  if code and int(code.group(1)) in WRITE_ERRNOS:
    return True
  return any(os.strerror(n) in message for n in WRITE_ERRNOS)


_OPERATION_ID = re.compile(r"\[operation_id=(\d+)\]")  # one Orbax save, in its logs


class _QuietOrbaxWriteErrors(logging.Filter):
  """Drops Orbax's own error logs (each with a long traceback, from several background
  threads) about a write the disk refused, and asyncio's "Task exception was never
  retrieved" for Orbax's abandoned write tasks: Checkpointer turns that failure into a
  one-line UserError instead, and the later errors of the same save (same Orbax
  operation_id). Every other log passes."""

  def __init__(self):
    super().__init__()
    self.failed_operations: set[str] = set()

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.WARNING:
      return True
    if record.name != "asyncio" and f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    try:
      operation = _OPERATION_ID.search(record.getMessage())
    except Exception:  # pylint: disable=broad-except
      operation = None
    if _refused_write(record):
      _ORBAX_OPERATION_FAILED.set()
      if operation:
        self.failed_operations.add(operation.group(1))
      return False
    if _ORBAX_OPERATION_FAILED.is_set() and _orbax_task_debris(record):
      return False
    # The rest of a refused save: its other threads fail in turn, e.g. at interpreter exit.
    return not (operation and operation.group(1) in self.failed_operations)


def _shutdown_error(exc: BaseException | None) -> bool:
  """What an Orbax task still in flight dies of once its failed save (or the interpreter's
  exit) shut its executor or its event loop down."""
  return isinstance(exc, RuntimeError) and (
      str(exc) == "Event loop is closed"
      or str(exc).startswith("cannot schedule new futures after"))  # [interpreter] shutdown


def _orbax_task_debris(record: logging.LogRecord) -> bool:
  """asyncio's report of an abandoned Orbax task that died of the shutdown of a failed save."""
  if record.name != "asyncio" or not _shutdown_error(record.exc_info and record.exc_info[1]):
    return False
  try:
    message = record.getMessage()
  except Exception:  # pylint: disable=broad-except
    return False
  return f"{os.sep}orbax{os.sep}" in message


def _in_orbax(obj) -> bool:
  code = getattr(obj, "cr_code", None) or getattr(obj, "gi_code", None)
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _quiet_unraisable(unraisable) -> None:
  """Drops the "Exception ignored in ..." tracebacks that are the debris of an Orbax save
  or restore that already failed (and was reported): TensorStore reads/writes still in
  flight complete into the closed event loop of the failed operation ("RuntimeError:
  Event loop is closed"), and its coroutines are closed unfinished (their error chains
  end in GeneratorExit), at the latest at interpreter exit."""
  exc = unraisable.exc_value
  if _shutdown_error(exc):
    if _ORBAX_OPERATION_FAILED.is_set():
      return
    if unraisable.object is None and not _HELD.exiting:
      # From a TensorStore callback thread, which cannot say whose loop it was: it can
      # arrive before the save's failure reaches the main thread. Held until then.
      _HELD.hold(unraisable)
      return
  if _in_orbax(unraisable.object) and (_ORBAX_OPERATION_FAILED.is_set() or any(
      isinstance(e, GeneratorExit) for e in exception_chain(exc))):
    return
  _previous_unraisablehook(unraisable)


class _HeldReports:
  """Unraisable reports that are debris if an Orbax operation failed: dropped once one
  did, printed as they came once a save completed, or at exit, if none did."""

  def __init__(self):
    self._lock = threading.Lock()
    self._reports: list = []
    self.exiting = False

  def hold(self, unraisable) -> None:
    with self._lock:
      self._reports.append(unraisable)

  def release(self) -> None:
    with self._lock:
      reports, self._reports = self._reports, []
    if not _ORBAX_OPERATION_FAILED.is_set():
      for unraisable in reports:
        _previous_unraisablehook(unraisable)

  def release_at_exit(self) -> None:
    self.exiting = True
    self.release()


_HELD = _HeldReports()
_LOG_FILTER = _QuietOrbaxWriteErrors()
_previous_unraisablehook = sys.unraisablehook


def install() -> None:
  """Quiets the debris of failed Orbax operations in this process (idempotent)."""
  global _previous_unraisablehook
  for name in ("absl", "asyncio"):  # Orbax logs through absl.logging
    logger = logging.getLogger(name)
    if _LOG_FILTER not in logger.filters:
      logger.addFilter(_LOG_FILTER)
  if sys.unraisablehook is not _quiet_unraisable:
    _previous_unraisablehook = sys.unraisablehook
    sys.unraisablehook = _quiet_unraisable
    atexit.register(_HELD.release_at_exit)


def mark_failed() -> None:
  """An Orbax save or restore failed (and was reported): its debris is dropped from now on."""
  _ORBAX_OPERATION_FAILED.set()


def save_completed() -> None:
  """A save went well: reports held meanwhile were not its debris, and are printed."""
  _HELD.release()
