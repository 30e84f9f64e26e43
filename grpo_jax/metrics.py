"""Metrics out of the training loop: TensorBoard + JSONL through CLU writers, a curve plot,
and a live progress line.

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

import functools
import io
import json
import math
import struct
import sys
import time
from typing import Any, Iterable, Mapping, Sequence, TextIO

import numpy as np
from clu import metric_writers
from etils import epath
from google.protobuf import message
from tensorboard.compat.proto import event_pb2

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
HPARAMS_FILE = "hparams.json"
CURVES_FILE = "curves.png"

DEFAULT_CURVES = ("reward", "reward_std", "rewards/correctness_reward/mean", "eval/accuracy",
                  "kl")


# --------------------------------------------------------------------------- JSON values


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


# --------------------------------------------------------------------------- JSONL writer


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
  `_truncate_event_file`). Each file is written to a temporary name and renamed over the
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
      _truncate_event_file(path, step)


# --------------------------------------------------------------------------- event files
#
# An event file is a TFRecord file of serialized `Event` protos. Each record is
#   uint64 length | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)
# (little-endian). Records are copied verbatim, so only the checksums of what is read are
# computed, with numpy: tensorboard's pure-Python crc32c does ~2 MB/s, and a long run's
# event file is tens of MB. No TensorFlow code runs here.

EVENT_FILE_PATTERN = "events.out.tfevents.*"
# Not matching "*tfevents*", which TensorBoard loads: a temporary left by a kill is ignored
# by it (and overwritten by the next truncation).
_EVENT_TEMPORARY = ".event_file_rewrite.tmp"
_CRC_CHUNK = 1024  # bytes a vectorised CRC pass handles per record before chunks combine
_CRC32C_POLY = 0x82F63B78  # Castagnoli, bit-reversed
_CRC_MASK_DELTA = 0xA282EAD8


@functools.lru_cache(maxsize=None)
def _crc32c_tables() -> tuple[np.ndarray, np.ndarray]:
  """The byte table of CRC-32C, and the (4, 256) tables of the linear map "feed
  _CRC_CHUNK zero bytes" applied to each byte of the register."""
  table = np.arange(256, dtype=np.uint32)
  for _ in range(8):
    table = np.where(table & 1, (table >> 1) ^ np.uint32(_CRC32C_POLY), table >> 1)
  zeros = (np.arange(256, dtype=np.uint32)[None, :]
           << (8 * np.arange(4, dtype=np.uint32))[:, None]).reshape(-1)
  for _ in range(_CRC_CHUNK):
    zeros = table[zeros & 0xFF] ^ (zeros >> 8)
  return table, zeros.reshape(4, 256)


def _crc_registers(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                   registers: np.ndarray) -> np.ndarray:
  """The CRC-32C registers after feeding each slice data[start:start+length] into the
  matching register: one numpy pass per byte position, over all slices at once."""
  table, _ = _crc32c_tables()
  order = np.argsort(-lengths, kind="stable")  # longest first: the live ones are a prefix
  starts, lengths, registers = starts[order], lengths[order], registers[order].copy()
  longest = int(lengths[0]) if len(lengths) else 0
  live = np.searchsorted(-lengths, -np.arange(longest), side="left")  # count with length > i
  for i in range(longest):
    k = live[i]
    register = registers[:k]
    registers[:k] = table[(register ^ data[starts[:k] + i]) & 0xFF] ^ (register >> 8)
  out = np.empty_like(registers)
  out[order] = registers
  return out


def _masked_crc32c(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """TFRecord's masked CRC-32C of each slice data[start:start+length] (uint8 `data`).

  CRC registers are linear over GF(2): feeding a chunk into register r gives
  feed(r, zeros) ^ feed(0, chunk). So a slice is cut into a head and whole _CRC_CHUNK
  chunks, all of which are fed in one vectorised pass, and then combined in order with
  the precomputed "feed _CRC_CHUNK zeros" map; no Python loop runs per byte of a long
  record.
  """
  _, zeros = _crc32c_tables()
  starts = np.asarray(starts, dtype=np.int64)
  lengths = np.asarray(lengths, dtype=np.int64)
  chunks = np.maximum(lengths - 1, 0) // _CRC_CHUNK  # whole chunks after the head
  heads = lengths - chunks * _CRC_CHUNK
  registers = _crc_registers(data, starts, heads, np.full(len(starts), 0xFFFFFFFF, np.uint32))
  if chunks.any():
    owner = np.repeat(np.arange(len(starts)), chunks)
    first = np.cumsum(chunks) - chunks  # index of each slice's first chunk
    index = np.arange(len(owner)) - first[owner]
    chunk_starts = starts[owner] + heads[owner] + index * _CRC_CHUNK
    fed = _crc_registers(data, chunk_starts, np.full(len(owner), _CRC_CHUNK, np.int64),
                         np.zeros(len(owner), np.uint32))
    long = np.nonzero(chunks)[0]
    long = long[np.argsort(-chunks[long], kind="stable")]
    live = np.searchsorted(-chunks[long], -np.arange(int(chunks[long[0]])), side="left")
    for j, k in enumerate(live):
      rows = long[:k]
      r = registers[rows]
      registers[rows] = (zeros[0][r & 0xFF] ^ zeros[1][(r >> 8) & 0xFF]
                         ^ zeros[2][(r >> 16) & 0xFF] ^ zeros[3][r >> 24] ^ fed[first[rows] + j])
  crc = (registers ^ np.uint32(0xFFFFFFFF)).astype(np.uint64)
  return ((((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF).astype(np.uint32)


def _event_records(data: bytes) -> tuple[list[tuple[int, int]], bool]:
  """The (start, end) byte ranges of the intact records at the head of a TFRecord file,
  and whether the whole file is intact.

  Reading stops at the first record that is cut short (a kill mid-write) or fails either
  checksum (garbage, or a zero-filled tail after a crash): the records before it are the
  good ones, and what follows a broken length cannot be framed anyway.
  """
  spans, offset = [], 0
  while len(data) - offset >= 12:
    (length,) = struct.unpack_from("<Q", data, offset)
    end = offset + 12 + length + 4
    if end > len(data):
      break
    spans.append((offset, end))
    offset = end
  if spans:
    buffer = np.frombuffer(data, dtype=np.uint8)
    starts = np.array([start for start, _ in spans], dtype=np.int64)
    ends = np.array([end for _, end in spans], dtype=np.int64)
    stored = buffer[np.concatenate([starts + 8, ends - 4])[:, None] + np.arange(4)]
    stored = stored.astype(np.uint32) @ (np.uint32(1) << (8 * np.arange(4, dtype=np.uint32)))
    computed = _masked_crc32c(buffer, np.concatenate([starts, starts + 12]),
                              np.concatenate([np.full(len(spans), 8), ends - starts - 16]))
    ok = (stored[:len(spans)] == computed[:len(spans)]) & (
        stored[len(spans):] == computed[len(spans):])
    if not ok.all():
      spans = spans[:int(np.argmin(ok))]
  intact = (spans[-1][1] == len(data)) if spans else not data
  return spans, intact


def _truncate_event_file(path: epath.Path, step: int) -> None:
  """Rewrites one event file without its events of steps > `step` and without a damaged
  tail; leaves it untouched when there is nothing to drop.

  Events without a step (file_version and the like: step 0) are kept. A record that is
  intact but not an Event proto has no step to judge, and is kept as it is.
  """
  data = path.read_bytes()
  spans, intact = _event_records(data)
  kept = []
  for start, end in spans:
    try:
      event_step = event_pb2.Event.FromString(data[start + 12:end - 4]).step
    except message.DecodeError:
      event_step = step
    if event_step <= step:
      kept.append((start, end))
  if intact and len(kept) == len(spans):
    return
  temporary = path.parent / _EVENT_TEMPORARY
  temporary.write_bytes(b"".join(data[start:end] for start, end in kept))
  temporary.replace(path)  # whole file or old file, never half of one


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


# --------------------------------------------------------------------------- writer factory


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


# --------------------------------------------------------------------------- curves


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one key, leaving out steps where it is missing or non-finite."""
  points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
  return [s for s, _ in points], [float(v) for _, v in points]


def plot_curves(logdir: epath.PathLike, keys: Iterable[str] = DEFAULT_CURVES) -> epath.Path:
  """Writes `<logdir>/curves.png`: one subplot per key that has data, x = step.

  Uses a bare Figure with the Agg canvas (no pyplot), so it works headless and leaves
  matplotlib's global backend alone. With no data at all the image says so.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  logdir = epath.Path(logdir)
  records = read_metrics(logdir)
  curves = [(key, *_series(records, key)) for key in dict.fromkeys(keys)]
  curves = [curve for curve in curves if curve[1]]
  columns = min(3, max(1, len(curves)))
  rows = max(1, math.ceil(len(curves) / columns))
  figure = Figure(figsize=(4.5 * columns, 3.2 * rows), layout="constrained")
  FigureCanvasAgg(figure)
  if not curves:
    figure.text(0.5, 0.5, "no metrics yet", ha="center", va="center")
  for index, (key, steps, values) in enumerate(curves):
    axes = figure.add_subplot(rows, columns, index + 1)
    axes.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3)
    axes.set_title(key)
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=100)
  path = logdir / CURVES_FILE
  path.write_bytes(buffer.getvalue())
  return path


# --------------------------------------------------------------------------- progress line


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
  the last step, so logs stay short. Rate and ETA use wall time since construction over
  steps since `start_step` (a resumed run does not count the restored steps). The clock is
  injectable so tests need no sleeps.
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
    done, elapsed = step - self.start_step, now - self._start_time
    if done > 0 and elapsed > 0:
      rate = done / elapsed
      # Big models take seconds per step; "0.08 steps/s" reads worse than "12.5 s/step".
      parts.append(f"{rate:.1f} steps/s" if rate >= 1 else f"{1 / rate:.1f} s/step")
      parts.append(f"ETA {_duration(max(0, self.total_steps - step) / rate)}")
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


# --------------------------------------------------------------------------- log window

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
