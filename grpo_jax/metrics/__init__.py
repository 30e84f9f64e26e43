"""Metrics out of the training loop: TensorBoard + JSONL through CLU writers (`jsonl`,
`event_files`), a curve plot (`plot`), a live progress line (`progress`) and the log window
(`window`).

TensorBoard is for browsing; `metrics.jsonl` is for scripts (and for us in tests): one JSON
object per `write_scalars` call, readable with nothing but `json`. Several calls for the same
step give several lines; readers merge them by step (`read_metrics` does).

Files in the metrics logdir (`<workdir>/grpo_metrics/`):
  events.out.tfevents.*   TensorBoard (CLU's SummaryWriter)
  metrics.jsonl           {"step": 10, "reward": 0.5, ...}, non-finite values as null
  samples.jsonl           {"step": 10, "sample/0": "completion text", ...}
  hparams.json            the run's hyper-parameters
  curves.png              `plot_curves`

Paths go through `etils.epath`, so a `gs://` logdir works like a local one.

On resume, `truncate_after(logdir, step)` drops the steps after the checkpoint from all of
these: the JSONL files and the existing event files, so TensorBoard shows each step once.

Note: importing this module imports TensorFlow (clu.metric_writers does, for its
SummaryWriter), which costs a few seconds of start-up.
"""

from __future__ import annotations

from clu import metric_writers
from etils import epath

from grpo_jax.metrics.event_files import EVENT_FILE_PATTERN
from grpo_jax.metrics.jsonl import (HPARAMS_FILE, METRICS_FILE, SAMPLES_FILE, JsonlWriter,
                                    read_metrics, truncate_after)
from grpo_jax.metrics.plot import CURVES_FILE, DEFAULT_CURVES, plot_curves
from grpo_jax.metrics.progress import ProgressLine
from grpo_jax.metrics.window import SUMMED_METRICS, MetricWindow


def create_writer(logdir: epath.PathLike, *, enabled: bool = True) -> metric_writers.MultiWriter:
  """TensorBoard + JSONL writers on `logdir` (created); a writer of nothing if not enabled.

  `enabled=False` is for the non-zero processes of a multi-host run, so that one process
  owns the files. No LoggingWriter: the terminal shows `ProgressLine`, and a log line per
  scalar would bury it.
  """
  if not enabled:
    return metric_writers.MultiWriter([])
  logdir = epath.Path(logdir)
  logdir.mkdir(parents=True, exist_ok=True)
  return metric_writers.MultiWriter([
      metric_writers.SummaryWriter(str(logdir)),
      JsonlWriter(logdir),
  ])


__all__ = ["CURVES_FILE", "DEFAULT_CURVES", "EVENT_FILE_PATTERN", "HPARAMS_FILE",
           "METRICS_FILE", "SAMPLES_FILE", "SUMMED_METRICS", "JsonlWriter", "MetricWindow",
           "ProgressLine", "create_writer", "plot_curves", "read_metrics", "truncate_after"]
