"""The live progress line on the terminal (or one line per step in a log file)."""

from __future__ import annotations

import sys
import time
from typing import Any, Mapping, TextIO

import numpy as np


def _duration(seconds: float) -> str:
  """Compact h/m/s: 45s, 1m27s, 2h03m."""
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


def _number(value: Any) -> str:
  return "nan" if value is None else f"{float(np.asarray(value)):.3g}"


class ProgressLine:
  """One live status line: `step 120/400 | reward 0.61 | acc 0.45 | 3.2 steps/s | ETA 1m27s`.

  On a terminal the line is rewritten in place. Elsewhere (CI, log files) a full line is
  printed only at the first update, each 10% of progress, every `interval_s` seconds and
  the last step, so logs stay short. The loop updates it once per step, after that step's
  evaluation, so `acc` is the step's own. Rate and ETA leave the first step out (it
  compiles the programs): they count from the first update after `start_step` (a resumed
  run does not count the restored steps), which itself shows how long it took. With a
  time budget (`set_deadline`) the ETA is the sooner of the steps' and the budget's end.
  The clock is injectable so tests need no sleeps.
  """

  def __init__(self, total_steps: int, stream: TextIO | None = None, start_step: int = 0,
               *, clock=time.monotonic, interval_s: float = 10.0):
    self.total_steps = int(total_steps)
    self.stream = sys.stderr if stream is None else stream
    self.start_step = int(start_step)
    self._clock = clock
    self._start_time = clock()
    self._interval_s = interval_s
    self._tty = _is_tty(self.stream)
    self._latest: dict[str, Any] = {}
    self._line = ""
    self._printed: tuple[int, float] | None = None  # (step, time) of the last non-TTY line
    self._pending = False  # a non-TTY line rendered but not printed
    self._open = False  # a TTY line without its newline yet
    self._anchor: tuple[int, float] | None = None  # (step, time) of the first step done
    self._deadline: float | None = None

  def set_deadline(self, deadline: float | None) -> None:
    """The clock time the run's time budget ends at (`max_train_minutes`), or None."""
    self._deadline = deadline

  def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
    """Records the latest reward/accuracy and redraws (or maybe prints) the line."""
    for key in ("reward", "eval/accuracy"):
      if metrics and key in metrics:
        self._latest[key] = metrics[key]
    now = self._clock()
    self._line = self.render(step, now)
    if self._tty:
      self.stream.write("\r" + self._line + "\x1b[K")
      self.stream.flush()
      self._open = True
    elif self._due(step, now):
      self._print_line(step, now)
    else:
      self._pending = True

  def render(self, step: int, now: float) -> str:
    """The status text for `step` at clock time `now`."""
    parts = [f"step {step}/{self.total_steps}"]
    if "reward" in self._latest:
      parts.append(f"reward {_number(self._latest['reward'])}")
    if "eval/accuracy" in self._latest:
      parts.append(f"acc {_number(self._latest['eval/accuracy'])}")
    if step > self.start_step and self._anchor is None:
      self._anchor = (step, now)
      first = step - self.start_step
      parts.append(f"{'first step' if first == 1 else f'{first} steps'} "
                   f"{_duration(now - self._start_time)} (compiling)")
    elif self._anchor is not None and step > self._anchor[0] and now > self._anchor[1]:
      rate = (step - self._anchor[0]) / (now - self._anchor[1])
      # Big models take seconds per step; "0.08 steps/s" reads worse than "12.5 s/step".
      parts.append(f"{rate:.1f} steps/s" if rate >= 1 else f"{1 / rate:.1f} s/step")
      eta = max(0, self.total_steps - step) / rate
      if self._deadline is not None:
        eta = min(eta, max(0.0, self._deadline - now))
      parts.append(f"ETA {_duration(eta)}")
    return " | ".join(parts)

  def _due(self, step: int, now: float) -> bool:
    if self._printed is None or step >= self.total_steps:
      return True
    last_step, last_time = self._printed
    decile = lambda s: (10 * (s - self.start_step)) // max(1, self.total_steps - self.start_step)
    return decile(step) > decile(last_step) or now - last_time >= self._interval_s

  def _print_line(self, step: int, now: float) -> None:
    self.stream.write(self._line + "\n")
    self.stream.flush()
    self._printed = (step, now)
    self._pending = False

  def close(self) -> None:
    """Ends the line: a newline on a terminal; elsewhere the last state if not yet printed."""
    if self._open:
      self.stream.write("\n")
      self._open = False
    elif self._pending:
      self.stream.write(self._line + "\n")
      self._pending = False
    self.stream.flush()

  def __enter__(self) -> ProgressLine:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _is_tty(stream: TextIO) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # no isatty, or a closed stream
    return False
