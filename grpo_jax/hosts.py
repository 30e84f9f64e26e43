"""Multi-host coordination, each rule once: which process writes, what every host must
agree on, and where they wait for each other. One host (the usual case): no collective
runs and each function is its trivial answer.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def is_primary() -> bool:
  """Metrics, plots, exports and shared files are written by process 0 only (one per
  slice, not per host)."""
  return jax.process_index() == 0


def agree(value, reduce=np.sum):
  """`reduce` (np.sum, np.max, np.min, np.any, np.all) of an integer or boolean over every
  host: what all hosts must agree on (how many sampling rounds or turns to run, a shape to
  compile: each is one collective program over all of them). One host: the value itself.
  int32 on the wire (no x64)."""
  if jax.process_count() == 1:
    return reduce(np.asarray(value)).item()
  return reduce(multihost_utils.process_allgather(np.int32(value))).item()


def barrier(name: str) -> None:
  """Every host waits here until all have reached `name` (a unique name per point)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def from_primary(value: np.ndarray) -> np.ndarray:
  """Process 0's `value` on every host (a name or tag they must share)."""
  if jax.process_count() == 1:
    return value
  return multihost_utils.broadcast_one_to_all(value)
