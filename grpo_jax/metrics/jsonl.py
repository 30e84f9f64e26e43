"""metrics.jsonl and samples.jsonl: one JSON object per `write_scalars` / `write_texts`
call (non-finite values as null), readable with nothing but `json`; `read_metrics` merges
them by step. `truncate_after` drops what a resumed run logs again, from these files and
the TensorBoard event files (`event_files`)."""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, TextIO

import numpy as np
from clu import metric_writers
from etils import epath

from grpo_jax.metrics.event_files import EVENT_FILE_PATTERN, truncate_event_file

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
HPARAMS_FILE = "hparams.json"
CURVES_FILE = "curves.png"



def _plain_float(key: str, value: Any) -> float | None:
  """A numpy/jax/Python scalar as a float; None for NaN/inf, which strict JSON cannot hold."""
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f"metric {key!r} must be a scalar, got shape {array.shape}")
  number = float(array.reshape(()))
  return number if math.isfinite(number) else None


def _jsonable(value: Any) -> Any:
  """Hyper-parameters as strict JSON: containers recursed, scalars plain, the rest as str."""
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  return str(value)


def _dumps(record: Mapping[str, Any]) -> str:
  # allow_nan=False: a NaN that slipped through is a bug here, not a file others can't parse.
  return json.dumps(record, allow_nan=False, ensure_ascii=False)


class JsonlWriter(metric_writers.MetricWriter):
  """A CLU MetricWriter for scalars (metrics.jsonl), texts (samples.jsonl) and hparams.

  Files are opened in append mode, so a resumed run continues the same files (call
  `truncate_after(logdir, step)` first to drop the steps the run is about to redo). Each
  record is flushed as it is written: a crash loses at most the line being written.
  Images, videos, audios, histograms and raw summaries have no JSON form worth having and
  are left to TensorBoard: those methods do nothing.
  """

  def __init__(self, logdir: epath.PathLike):
    self._logdir = epath.Path(logdir)
    self._logdir.mkdir(parents=True, exist_ok=True)
    self._files: dict[str, TextIO] = {}

  @property
  def logdir(self) -> epath.Path:
    return self._logdir

  def _append(self, name: str, record: Mapping[str, Any]) -> None:
    if name not in self._files:
      self._files[name] = (self._logdir / name).open("a")
    handle = self._files[name]
    handle.write(_dumps(record) + "\n")
    handle.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {"step": int(step)}
    record.update({key: _plain_float(key, value) for key, value in scalars.items()})
    self._append(METRICS_FILE, record)

  def write_texts(self, step: int, texts: Mapping[str, str]):
    record = {"step": int(step)}
    record.update({key: str(text) for key, text in texts.items()})
    self._append(SAMPLES_FILE, record)

  def write_hparams(self, hparams: Mapping[str, Any]):
    text = json.dumps(_jsonable(hparams), allow_nan=False, indent=2, sort_keys=True)
    (self._logdir / HPARAMS_FILE).write_text(text + "\n")

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Mapping[str, Any] | None = None):
    """No-op: raw tensor summaries are TensorBoard's business."""

  def write_images(self, step: int, images: Mapping[str, Any]):
    """No-op: images go to TensorBoard only."""

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    """No-op: videos go to TensorBoard only."""

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
    """No-op: audio goes to TensorBoard only."""

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None):
    """No-op: histograms go to TensorBoard only."""

  def flush(self):
    for handle in self._files.values():
      handle.flush()

  def close(self):
    for handle in self._files.values():
      handle.close()
    self._files.clear()

  def truncate_after(self, step: int) -> None:
    """Drops records after `step` from this writer's files (closing them first)."""
    self.close()
    truncate_after(self._logdir, step)


def _read_records(path: epath.Path) -> list[dict[str, Any]]:
  """The JSON objects of a JSONL file; a torn last line (a crash mid-write) is skipped."""
  if not path.exists():
    return []
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  records = []
  for index, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if index != len(lines) - 1:
        raise ValueError(f"{path}: line {index + 1} is not valid JSON: {line[:80]!r}")
  return records


def truncate_after(logdir: epath.PathLike, step: int) -> None:
  """Drops everything logged for steps > `step`: from metrics.jsonl, samples.jsonl and the
  TensorBoard event files.

  Called when a run resumes from a checkpoint at `step`: the steps after it are trained
  (and logged) again, and must not appear twice. The resumed run's SummaryWriter starts a
  new event file, so the old files are rewritten to end at `step` (see
  `truncate_event_file`). Each file is written to a temporary name and renamed over the
  old one: a kill during truncation leaves every file whole, old or new. No writer may
  hold the files open.
  """
  logdir = epath.Path(logdir)
  for name in (METRICS_FILE, SAMPLES_FILE):
    path = logdir / name
    if not path.exists():
      continue
    kept = [r for r in _read_records(path) if r.get("step", 0) <= step]
    temporary = logdir / (name + ".tmp")
    temporary.write_text("".join(_dumps(r) + "\n" for r in kept))
    temporary.replace(path)  # whole file or old file, never half of one
  if logdir.exists():
    for path in sorted(logdir.glob(EVENT_FILE_PATTERN)):
      truncate_event_file(path, step)


def read_metrics(logdir_or_path: epath.PathLike) -> list[dict[str, Any]]:
  """Records of metrics.jsonl merged by step (later keys win), sorted by step.

  Takes a logdir or the path of the .jsonl file itself. NaN/inf were stored as null and
  come back as None.
  """
  path = epath.Path(logdir_or_path)
  if not path.name.endswith(".jsonl"):
    path = path / METRICS_FILE
  by_step: dict[int, dict[str, Any]] = {}
  for record in _read_records(path):
    by_step.setdefault(int(record["step"]), {}).update(record)
  return [by_step[step] for step in sorted(by_step)]
