"""SIGTERM / SIGINT as a request to stop cleanly: the loop checkpoints and exits in time.

Spot and preemptible TPU slices send SIGTERM about 30 seconds before they go. The first
SIGTERM or SIGINT only sets a flag, which the loop reads between the phases of a step: a
step whose update has not started is abandoned (its data position is given back, so the
resumed run samples it again with the same key), a finished step is checkpointed, and the
process exits with 128 + the signal's number (143, 130). If that takes longer than the
grace period, or a second signal comes, the process exits at once: checkpoints are
written to a temporary name and renamed when complete, so the newest complete one is
still there to resume from.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import jax
import numpy as np

from grpo_jax import hosts

log = logging.getLogger("grpo_jax")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """The run stopped on a signal after checkpointing; `message` says how to resume."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum
    self.exit_code = 128 + signum


def signal_name(signum: int) -> str:
  return signal.Signals(signum).name


class StopRequests:
  """Context manager that turns SIGTERM / SIGINT into `requested()` while it is active.

  `grace_seconds`: how long after the first signal the process may take to stop;
  `resume_hint()`: called for the line printed when the process must exit at once.
  Outside the main thread (where Python cannot install handlers) it does nothing.
  """

  def __init__(self, grace_seconds: float, resume_hint=lambda: ""):
    self.grace_seconds = grace_seconds
    self.resume_hint = resume_hint
    self.signum: int | None = None
    self._previous: dict[int, object] = {}
    self._watchdog: threading.Timer | None = None

  def __enter__(self) -> StopRequests:
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()
    if self._watchdog is not None:  # stopped in time: a caller that goes on (in-process
      self._watchdog.cancel()       # use, tests) must not be killed later by the timer
      self._watchdog = None

  def _handle(self, signum, frame) -> None:
    if self.signum is not None:
      self._exit_now(signum, f"second {signal_name(signum)}: exiting at once")
    self.signum = signum
    log.warning("%s received: stopping after a checkpoint (grace %.0f s; a second signal "
                "exits at once)", signal_name(signum), self.grace_seconds)
    self._watchdog = threading.Timer(self.grace_seconds, self._exit_now, args=(
        signum, f"could not stop within preemption_grace_seconds={self.grace_seconds:g}"))
    self._watchdog.daemon = True
    self._watchdog.start()

  def _exit_now(self, signum: int, why: str) -> None:
    sys.stderr.write(f"grpo_jax: {why}; {self.resume_hint()}\n")
    sys.stderr.flush()
    os._exit(128 + signum)  # no interpreter shutdown: other threads may hold locks

  def requested(self) -> bool:
    """Whether to stop now. Multi-host: whether any host got a signal (collective: every
    host must call it at the same points of the loop, which the loop's phases are)."""
    stop = self.signum is not None
    if jax.process_count() > 1:
      stop = bool(hosts.agree(stop, np.any))
      if stop and self.signum is None:  # another host was signalled: stop with it
        self.signum = signal.SIGTERM
    return stop
