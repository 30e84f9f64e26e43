"""Metrics: JSONL and TensorBoard through CLU writers, resume truncation, curves, progress."""

import io
import json
import re
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from clu import metric_writers

from grpo_jax import metrics
from grpo_jax.metrics import event_files
from tensorboard.util import tensor_util


def _raw_lines(path):
  """Lines of a JSONL file, parsed strictly (NaN/Infinity tokens are not JSON)."""
  def reject(token):
    raise AssertionError(f"non-standard JSON token {token}")
  return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


class FakeClock:
  """A clock the test moves by hand."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


class TtyStream(io.StringIO):

  def isatty(self):
    return True


# --------------------------------------------------------------------------- JSONL


def test_jsonl_round_trip_with_numpy_jax_and_non_finite(tmp_path):
  writer = metrics.JsonlWriter(tmp_path)
  assert isinstance(writer, metric_writers.MetricWriter)
  writer.write_scalars(np.int64(3), {"a": np.float32(0.5), "b": jnp.array(2.25),
                                     "c": float("nan"), "d": np.inf, "e": 7,
                                     "f": jnp.float32(-jnp.inf)})
  writer.close()
  [raw] = _raw_lines(tmp_path / "metrics.jsonl")
  assert raw == {"step": 3, "a": 0.5, "b": 2.25, "c": None, "d": None, "e": 7.0, "f": None}
  assert all(type(raw[k]) is float for k in "abe")
  assert metrics.read_metrics(tmp_path) == [raw]
  assert metrics.read_metrics(tmp_path / "metrics.jsonl") == [raw]


def test_non_scalar_metric_is_rejected_with_its_name(tmp_path):
  writer = metrics.JsonlWriter(tmp_path)
  with pytest.raises(ValueError, match="'vec'"):
    writer.write_scalars(0, {"vec": np.ones(3)})


def test_writes_for_one_step_merge_by_step(tmp_path):
  writer = metrics.JsonlWriter(tmp_path)
  writer.write_scalars(1, {"a": 1.0, "b": 2.0})
  writer.write_scalars(0, {"a": 0.0})
  writer.write_scalars(1, {"eval/accuracy": 0.5})
  writer.write_scalars(1, {"a": 3.0})
  writer.flush()
  assert len(_raw_lines(tmp_path / "metrics.jsonl")) == 4
  assert metrics.read_metrics(tmp_path) == [
      {"step": 0, "a": 0.0},
      {"step": 1, "a": 3.0, "b": 2.0, "eval/accuracy": 0.5},
  ]


def test_read_metrics_of_missing_file_and_torn_last_line(tmp_path):
  assert metrics.read_metrics(tmp_path) == []
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a"')
  assert metrics.read_metrics(tmp_path) == [{"step": 1, "a": 1.0}]
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a"\n{"step": 2, "a": 1.0}\n')
  with pytest.raises(ValueError, match="line 1"):
    metrics.read_metrics(tmp_path)


def test_truncate_after_drops_later_steps_then_appending_continues(tmp_path):
  writer = metrics.JsonlWriter(tmp_path)
  for step in range(1, 6):
    writer.write_scalars(step, {"reward": step / 10})
    writer.write_texts(step, {"sample": f"text {step}"})
  writer.close()
  metrics.truncate_after(tmp_path, 3)
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 2, 3]
  assert [r["step"] for r in _raw_lines(tmp_path / "samples.jsonl")] == [1, 2, 3]
  assert not (tmp_path / "metrics.jsonl.tmp").exists()

  writer = metrics.JsonlWriter(tmp_path)  # the resumed run re-logs step 4 once
  writer.write_scalars(4, {"reward": 0.9})
  writer.truncate_after(2)  # the method closes its files before rewriting them
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 2]


def test_texts_go_to_samples_and_hparams_to_json(tmp_path):
  writer = metrics.JsonlWriter(tmp_path)
  writer.write_texts(7, {"sample/0": "The answer is 4.", "sample/1": "héllo\nworld"})
  writer.write_hparams({"learning_rate": 1e-5, "model": {"layers": np.int32(2)},
                        "beta": float("nan"), "funcs": ("a", "b")})
  writer.write_images(7, {"img": np.zeros((2, 2, 3))})  # ignored, must not fail
  writer.write_histograms(7, {"h": np.arange(5)})
  writer.close()
  assert _raw_lines(tmp_path / "samples.jsonl") == [
      {"step": 7, "sample/0": "The answer is 4.", "sample/1": "héllo\nworld"}]
  assert not (tmp_path / "metrics.jsonl").exists()
  assert json.loads((tmp_path / "hparams.json").read_text()) == {
      "learning_rate": 1e-5, "model": {"layers": 2}, "beta": None, "funcs": ["a", "b"]}


# --------------------------------------------------------------------------- create_writer


def _tensorboard_tensors(logdir):
  """{tag: [(step, value)]} from the event files, as TensorBoard itself reads them."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  accumulator = event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
  accumulator.Reload()
  return {tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item())
                for e in accumulator.Tensors(tag)]
          for tag in accumulator.Tags()["tensors"]}


def test_create_writer_writes_tensorboard_and_jsonl(tmp_path):
  logdir = tmp_path / "grpo_metrics"
  writer = metrics.create_writer(logdir)
  assert logdir.is_dir()
  writer.write_scalars(1, {"reward": jnp.float32(0.25), "kl": np.float64(0.01)})
  writer.write_scalars(2, {"reward": 0.75})
  writer.write_texts(2, {"sample": "hi"})
  writer.flush()
  assert list(logdir.glob("events.out.tfevents.*"))
  tensors = _tensorboard_tensors(logdir)
  assert tensors["reward"] == [(1, 0.25), (2, 0.75)]
  assert tensors["kl"] == [(1, pytest.approx(0.01))]
  assert tensors["sample"] == [(2, b"hi")]
  assert metrics.read_metrics(logdir) == [{"step": 1, "reward": 0.25, "kl": 0.01},
                                          {"step": 2, "reward": 0.75}]
  assert _raw_lines(logdir / "samples.jsonl") == [{"step": 2, "sample": "hi"}]
  writer.close()


def test_disabled_writer_writes_nothing(tmp_path):
  logdir = tmp_path / "grpo_metrics"
  writer = metrics.create_writer(logdir, enabled=False)
  writer.write_scalars(1, {"reward": 1.0})
  writer.write_texts(1, {"sample": "x"})
  writer.write_hparams({"lr": 1.0})
  writer.flush()
  writer.close()
  assert not logdir.exists()


def _tensorboard_scalars(logdir):
  """{tag: [(step, value)]} as TensorBoard shows them: every event file in `logdir`, in
  file order, nothing sampled away (size guidance 0) and TensorBoard's own purging on."""
  from tensorboard.backend.event_processing import event_accumulator
  accumulator = event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
  accumulator.Reload()
  return {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
                for e in accumulator.Tensors(tag)]
          for tag in accumulator.Tags()["tensors"]}


def _event_steps(path):
  """Steps of the events of one event file, read record by record with tensorboard's
  TFRecord reader (the file_version event included, as step 0)."""
  from tensorboard.backend.event_processing import event_file_loader
  return [e.step for e in event_file_loader.EventFileLoader(str(path)).Load()]


def test_truncate_after_rewrites_tensorboard_event_files(tmp_path):
  logdir = tmp_path / "grpo_metrics"
  writer = metrics.create_writer(logdir)  # the first run: steps 1..6, then killed
  for step in range(1, 7):
    writer.write_scalars(step, {"reward": step / 10, "kl": step / 100})
  writer.write_texts(5, {"sample": "old"})
  writer.close()
  [old_file] = logdir.glob("events.out.tfevents.*")

  metrics.truncate_after(logdir, 3)  # resumed from the checkpoint of step 3
  assert _event_steps(old_file) == [0, 1, 1, 2, 2, 3, 3]  # file_version, then 2 tags/step
  assert sorted(p.name for p in logdir.iterdir()) == sorted(
      [old_file.name, "metrics.jsonl", "samples.jsonl"])  # no temporary left behind

  writer = metrics.create_writer(logdir)  # the resumed run redoes steps 4..6
  for step in range(4, 7):
    writer.write_scalars(step, {"reward": step, "kl": -step})
  writer.close()
  assert len(list(logdir.glob("events.out.tfevents.*"))) == 2
  scalars = _tensorboard_scalars(logdir)
  assert sorted(scalars) == ["kl", "reward"]  # "sample" (step 5 only) is gone
  assert scalars["reward"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)),
                               (3, pytest.approx(0.3)), (4, 4.0), (5, 5.0), (6, 6.0)]
  assert scalars["kl"] == [(1, pytest.approx(0.01)), (2, pytest.approx(0.02)),
                           (3, pytest.approx(0.03)), (4, -4.0), (5, -5.0), (6, -6.0)]


def _event_file(logdir, steps):
  writer = metrics.create_writer(logdir)
  for step in steps:
    writer.write_scalars(step, {"reward": float(step)})
  writer.close()
  [path] = logdir.glob("events.out.tfevents.*")
  return path


@pytest.mark.parametrize("damage", ["torn_data", "torn_header", "bad_data_crc",
                                    "bad_length_crc", "zero_tail"])
def test_truncate_after_keeps_intact_records_before_a_damaged_tail(tmp_path, damage):
  path = _event_file(tmp_path, range(1, 6))
  data = path.read_bytes()
  last = event_files._event_records(data)[0][-1]  # (start, end) of the step-5 record
  start, end = last
  if damage == "torn_data":  # killed while writing the last record's payload
    data = data[:end - 7]
  elif damage == "torn_header":
    data = data[:start + 5]
  elif damage == "bad_data_crc":
    data = data[:end - 1] + bytes([data[end - 1] ^ 0xFF])
  elif damage == "bad_length_crc":
    data = data[:start + 8] + bytes([data[start + 8] ^ 0xFF]) + data[start + 9:]
  else:  # a crash left the file's last blocks zero-filled
    data = data[:start] + bytes(end - start + 100)
  path.write_bytes(data)
  metrics.truncate_after(tmp_path, 10)  # drops no step: only the damage goes
  assert path.read_bytes() == data[:start]  # the intact records, byte for byte
  assert _event_steps(path) == [0, 1, 2, 3, 4]
  metrics.truncate_after(tmp_path, 2)
  assert _event_steps(path) == [0, 1, 2]
  assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, "metrics.jsonl"]


def test_truncate_after_leaves_intact_files_with_nothing_to_drop_alone(tmp_path):
  path = _event_file(tmp_path, range(1, 4))
  before = path.stat().st_mtime_ns, path.read_bytes()
  metrics.truncate_after(tmp_path, 3)
  assert (path.stat().st_mtime_ns, path.read_bytes()) == before
  (tmp_path / "events.out.tfevents.0.empty").write_bytes(b"")  # created, nothing written
  metrics.truncate_after(tmp_path, 1)
  assert (tmp_path / "events.out.tfevents.0.empty").read_bytes() == b""
  assert _event_steps(path) == [0, 1]


def test_masked_crc32c_matches_tensorboard():
  from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
  rng = np.random.default_rng(0)
  chunk = event_files._CRC_CHUNK
  lengths = [0, 1, 8, 9, 100, chunk - 1, chunk, chunk + 1, 2 * chunk, 3 * chunk + 17, 5]
  buffers = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in lengths]
  data = b"".join(buffers)
  starts = np.cumsum([0] + lengths[:-1])
  got = event_files._masked_crc32c(np.frombuffer(data, np.uint8), starts, np.array(lengths))
  assert [int(c) for c in got] == [masked_crc32c(b) for b in buffers]
  # The CRC-32C check value, unmasked by hand: crc32c(b"123456789") == 0xE3069283.
  [masked] = event_files._masked_crc32c(np.frombuffer(b"123456789", np.uint8), np.array([0]),
                                    np.array([9]))
  unmasked = (int(masked) - 0xA282EAD8) & 0xFFFFFFFF
  assert ((unmasked >> 17) | (unmasked << 15)) & 0xFFFFFFFF == 0xE3069283


# --------------------------------------------------------------------------- curves


def _png_size(path):
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  assert data[12:16] == b"IHDR"
  return struct.unpack(">II", data[16:24])


def test_plot_curves_one_subplot_per_key_with_data(tmp_path):
  writer = metrics.JsonlWriter(tmp_path)
  for step in range(1, 6):
    writer.write_scalars(step, {"reward": step / 5, "kl": 0.01 * step, "loss": float("nan")})
  writer.write_scalars(5, {"eval/accuracy": 0.4})
  writer.close()
  path = metrics.plot_curves(tmp_path)  # reward_std, correctness: no data, skipped
  assert path == tmp_path / "curves.png"
  width, height = _png_size(path)
  assert (width, height) == (1350, 320)  # reward, eval/accuracy, kl: 3 columns x 1 row
  # Extra keys; "loss" is all-NaN (null) and "missing" absent: both skipped.
  path = metrics.plot_curves(tmp_path, keys=("reward", "loss", "missing", "kl", "reward"))
  assert _png_size(path) == (900, 320)


def test_plot_curves_without_metrics_still_writes_png(tmp_path):
  path = metrics.plot_curves(tmp_path)
  assert len(path.read_bytes()) > 0
  assert _png_size(path) == (450, 320)


# --------------------------------------------------------------------------- progress line


def test_progress_line_tty_rewrites_in_place():
  clock, stream = FakeClock(), TtyStream()
  progress = metrics.ProgressLine(400, stream=stream, start_step=100, clock=clock)
  clock.now = 10.0
  progress.update(120, {"reward": np.float32(0.61), "kl": 0.1})
  # The first update after a (re)start carries the compilation: its time, no rate.
  assert stream.getvalue() == "\rstep 120/400 | reward 0.61 | 20 steps 10s (compiling)\x1b[K"
  clock.now = 12.0
  progress.update(130, {"eval/accuracy": jnp.float32(0.45)})
  clock.now = 20.0
  progress.update(140, {"reward": 0.7})  # accuracy stays the latest seen
  *_, last = stream.getvalue().split("\r")
  # 20 steps in 10 s since step 120 = 2 steps/s; 260 left -> 130 s.
  assert last == "step 140/400 | reward 0.7 | acc 0.45 | 2.0 steps/s | ETA 2m10s\x1b[K"
  assert "\n" not in stream.getvalue()
  progress.close()
  assert stream.getvalue().endswith("\x1b[K\n")


def test_progress_line_leaves_the_compiling_first_step_out_of_the_eta():
  """A 2-minute run whose first step compiles for 20 s: the ETA is the steps', not 20 s x
  the steps left."""
  clock, stream = FakeClock(), io.StringIO()
  progress = metrics.ProgressLine(100, stream=stream, clock=clock, interval_s=0.0)
  clock.now = 20.0
  progress.update(1, {})
  assert stream.getvalue() == "step 1/100 | first step 20s (compiling)\n"
  clock.now = 21.0
  progress.update(2, {})
  assert stream.getvalue().endswith("step 2/100 | 1.0 steps/s | ETA 1m38s\n")


def test_progress_line_slow_steps_and_long_eta():
  clock, stream = FakeClock(), TtyStream()
  progress = metrics.ProgressLine(1000, stream=stream, clock=clock)
  progress.update(0, {})  # no steps done yet: no rate
  assert stream.getvalue() == "\rstep 0/1000\x1b[K"
  clock.now = 5.0
  progress.update(1, {})
  clock.now = 30.0
  progress.update(3, {})
  # 12.5 s per step, 997 steps left -> 12462.5 s = 3h27m42s (minutes shown, seconds dropped).
  assert stream.getvalue().endswith("\rstep 3/1000 | 12.5 s/step | ETA 3h27m\x1b[K")


def test_progress_line_eta_ends_with_the_time_budget():
  """max_train_minutes with a large max_steps: the ETA is the budget's end, not the steps'."""
  clock, stream = FakeClock(), TtyStream()
  progress = metrics.ProgressLine(100000, stream=stream, clock=clock)
  progress.set_deadline(600.0)
  clock.now = 10.0
  progress.update(1, {})
  clock.now = 20.0
  progress.update(2, {})
  assert stream.getvalue().endswith("\rstep 2/100000 | 10.0 s/step | ETA 9m40s\x1b[K")


def _printed_steps(text):
  return [int(m) for m in re.findall(r"^step (\d+)/", text, flags=re.M)]


def test_progress_line_non_tty_prints_each_tenth_and_final_step():
  clock, stream = FakeClock(), io.StringIO()
  progress = metrics.ProgressLine(100, stream=stream, clock=clock)
  for step in range(1, 101):
    clock.now = 0.1 * step  # fast steps: the time interval never triggers
    progress.update(step, {"reward": step / 100})
  progress.close()
  text = stream.getvalue()
  assert "\r" not in text and "\x1b" not in text
  assert _printed_steps(text) == [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
  assert text.endswith("step 100/100 | reward 1 | 10.0 steps/s | ETA 0s\n")


def test_progress_line_non_tty_prints_every_interval_and_last_state_on_close():
  clock, stream = FakeClock(), io.StringIO()
  progress = metrics.ProgressLine(1000, stream=stream, clock=clock)
  for step in range(1, 36):
    clock.now = float(step)  # 1 s per step: a line every 10 s, far from 10% of 1000
    progress.update(step, {"reward": 0.5})
  assert _printed_steps(stream.getvalue()) == [1, 11, 21, 31]
  progress.close()
  assert _printed_steps(stream.getvalue()) == [1, 11, 21, 31, 35]
  assert stream.getvalue().endswith("step 35/1000 | reward 0.5 | 1.0 steps/s | ETA 16m05s\n")
  progress.close()  # idempotent
  assert _printed_steps(stream.getvalue()) == [1, 11, 21, 31, 35]


# --------------------------------------------------------------------------- log window


def test_window_means_each_metric_over_the_steps_that_have_it_and_sums_counters():
  window = metrics.MetricWindow()
  window.add({"loss": 1.0, "reward": float("nan"), "nonfinite_skipped": 1.0, "kl": np.float32(2)})
  window.add({"loss": 2.0, "reward": 0.5, "nonfinite_skipped": 0.0})
  window.add({"loss": np.inf, "reward": 0.25, "nonfinite_skipped": 1.0, "only_nan": np.nan})
  record = window.pop()
  assert record["loss"] == np.inf  # an infinite value stays visible
  assert record["reward"] == 0.375  # the NaN step does not count (TRL's NaN-aware mean)
  assert record["kl"] == 2.0  # logged in one step of three: its own mean
  assert record["nonfinite_skipped"] == 2.0  # updates skipped in the window
  assert np.isnan(record["only_nan"])
  assert len(window) == 0 and window.pop() == {}


def test_a_window_of_one_step_is_that_step_exactly():
  window = metrics.MetricWindow()
  values = {"a": 0.1 + 0.2, "b": -0.0, "c": 1e-45, "nonfinite_skipped": 0.0}
  window.add(values)
  record = window.pop()
  assert record == values and np.signbit(record["b"])


def test_window_state_resumes_exactly_through_json():
  rng = np.random.default_rng(0)
  steps = [{"x": float(v), "y": float("nan") if i == 1 else float(v) / 3,
            "nonfinite_skipped": float(i % 2)} for i, v in enumerate(rng.normal(size=5))]
  straight = metrics.MetricWindow()
  for values in steps:
    straight.add(values)
  first = metrics.MetricWindow()
  for values in steps[:3]:
    first.add(values)
  resumed = metrics.MetricWindow()
  resumed.restore(json.loads(json.dumps(first.state())))  # as a checkpoint's meta holds it
  for values in steps[3:]:
    resumed.add(values)
  assert resumed.pop() == straight.pop()
  resumed.restore(None)  # a checkpoint written before windows existed
  assert len(resumed) == 0
