"""The steps since the last logged one, reduced to one record (`MetricWindow`)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

# Metrics that count events within a step: their window value is the sum over its steps
# (how many updates were skipped since the last record), not the mean.
SUMMED_METRICS = frozenset({"nonfinite_skipped"})


class MetricWindow:
  """The steps since the last logged one, reduced to one record (as Flax's lm1b does with
  its train metrics): each metric's mean over the window's steps, NaN-aware like TRL's
  log (a step where a metric is NaN does not count for it; NaN when none has a value),
  SUMMED_METRICS summed. With log_every=1 every record is the step's own values, bit for
  bit.

  `state()` is what a checkpoint keeps (JSON: float.hex, exact), so that a run resumed
  from a checkpoint in the middle of a window logs what an uninterrupted run logs.
  """

  def __init__(self):
    self._sums: dict[str, float] = {}
    self._counts: dict[str, int] = {}

  def add(self, step_metrics: Mapping[str, Any]) -> None:
    for key, value in step_metrics.items():
      value = float(np.asarray(value))
      self._counts.setdefault(key, 0)
      if math.isnan(value):
        continue
      # The first value is taken as is (not 0.0 + value): a window of one step is exact.
      self._sums[key] = self._sums[key] + value if self._counts[key] else value
      self._counts[key] += 1

  def __len__(self) -> int:
    return len(self._counts)

  def pop(self) -> dict[str, float]:
    """The window's record, emptying the window."""
    record = {}
    for key, count in self._counts.items():
      if not count:
        record[key] = math.nan
      elif key in SUMMED_METRICS:
        record[key] = self._sums[key]
      else:
        record[key] = self._sums[key] / count
    self._sums, self._counts = {}, {}
    return record

  def state(self) -> dict[str, list]:
    return {key: [float.hex(self._sums.get(key, 0.0)), count]
            for key, count in self._counts.items()}

  def restore(self, state: Mapping[str, Sequence] | None) -> None:
    self._sums, self._counts = {}, {}
    for key, (total, count) in (state or {}).items():
      self._counts[key] = int(count)
      if count:
        self._sums[key] = float.fromhex(total)
