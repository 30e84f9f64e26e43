"""Checkpointer: damaged checkpoints are passed over (one warning, moved aside), a disk that
refuses a write is one UserError line, and the last complete checkpoint stays restorable.

The state is a tiny TrainState saved at steps 1, 2, 3 (value s added to every leaf at step
s). Orbax (0.12) writes `<step>/state` as an OCDBT database: `manifest.ocdbt`, `_METADATA`
(the tree structure), `_sharding`, `array_metadatas/`, and the data in
`ocdbt.process_0/d/<hash>` files, with the b-tree copied up into `state/d/`. Values under
1 KiB are stored inline in the b-tree nodes, so "big" (4 KiB of random floats, which do not
compress) is there to give a separate array data file to truncate.
"""

import errno
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import threading
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils import epath

from grpo_jax import checkpoint, grpo
from grpo_jax.checkpoint import Checkpointer, IncompatibleCheckpointError, orbax_noise
from grpo_jax.errors import UserError

orbax_noise.install()  # as the command line does: the disk-full tests read what is left
FINGERPRINT = {"arch": "tiny", "vocab_size": 32}
PARAMS = {"w": jnp.arange(12.0).reshape(3, 4),
          "big": jax.random.normal(jax.random.key(0), (1024,))}


def state_at(step: int) -> grpo.TrainState:
  state = grpo.init_train_state(PARAMS, optax.adam(1e-3))
  return jax.tree.map(lambda x: x + step, state)


def assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def save_steps(ckdir, steps=(1, 2, 3), **kwargs) -> None:
  ckpt = Checkpointer(ckdir, FINGERPRINT, **kwargs)
  ckpt.save_reference(PARAMS)
  for step in steps:
    ckpt.save(step, state_at(step), {"data": step, "config": {"lr": 0.1 * step}})
  ckpt.close()


@pytest.fixture
def ckdir(tmp_path) -> pathlib.Path:
  path = tmp_path / "checkpoints"
  save_steps(path)
  return path


def warnings_of(caplog):
  return [r.getMessage() for r in caplog.records
          if r.name == "grpo_jax" and r.levelno >= logging.WARNING]


def largest_data_file(state_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


def truncate_array_file(step_dir, item="state"):
  path = largest_data_file(step_dir / item)
  assert path.stat().st_size > 1024  # "big"'s chunk, not a b-tree node
  os.truncate(path, 100)


def delete_tree_metadata(step_dir):
  (step_dir / "state" / "_METADATA").unlink()


def garbage_meta(step_dir):
  (step_dir / "meta" / "metadata").write_text("{not json")


def delete_state(step_dir):
  shutil.rmtree(step_dir / "state")


def drop_fingerprint(step_dir):
  (step_dir / "meta" / "metadata").write_text('{"data": 3}')


CORRUPTIONS = [truncate_array_file, delete_tree_metadata, garbage_meta, delete_state,
               drop_fingerprint]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_a_damaged_latest_step_is_passed_over_moved_aside_and_saved_again(
    ckdir, corrupt, caplog):
  corrupt(ckdir / "3")
  ckpt = Checkpointer(ckdir, FINGERPRINT)
  ckpt.check_compatible()  # the damaged meta is passed over here, silently
  assert warnings_of(caplog) == []
  with caplog.at_level(logging.WARNING, logger="grpo_jax"):
    restored = ckpt.restore_latest(state_at(0), PARAMS)

  assert restored.step == 2
  assert_tree_equal(restored.state, state_at(2))
  assert restored.meta == {"data": 2, "config": {"lr": 0.2}, "fingerprint": FINGERPRINT}
  assert_tree_equal(restored.reference, PARAMS)
  moved = ckdir.parent / "corrupt_checkpoints" / "3"
  [warning] = warnings_of(caplog)
  assert "\n" not in warning and len(warning) < 600
  assert f"{ckdir / '3'} cannot be restored (" in warning
  assert f"moved it to {moved}" in warning and "step 2" in warning
  assert not (ckdir / "3").exists() and moved.is_dir()
  assert ckpt.latest_step() == 2

  ckpt.save(3, state_at(30), {"data": 30})  # Orbax would refuse step 3 <= a latest 3
  ckpt.close()
  caplog.clear()
  again = Checkpointer(ckdir, FINGERPRINT)
  restored = again.restore_latest(state_at(0), PARAMS)
  assert restored.step == 3 and restored.meta["data"] == 30
  assert_tree_equal(restored.state, state_at(30))
  assert warnings_of(caplog) == []
  again.close()


def test_the_reasons_name_what_is_wrong(ckdir, caplog):
  truncate_array_file(ckdir / "3")
  delete_state(ckdir / "2")
  with caplog.at_level(logging.WARNING, logger="grpo_jax"):
    assert Checkpointer(ckdir, FINGERPRINT).restore_latest(state_at(0), PARAMS).step == 1
  truncated, no_state = warnings_of(caplog)
  assert "ValueError: OUT_OF_RANGE" in truncated and "params.big" in truncated
  assert "state/ is missing: KeyError" in no_state


def test_a_second_incident_of_the_same_step_does_not_overwrite_the_first(ckdir, caplog):
  garbage_meta(ckdir / "3")
  ckpt = Checkpointer(ckdir, FINGERPRINT)
  ckpt.restore_latest(state_at(0), PARAMS)
  ckpt.save(3, state_at(3), {"data": 3})
  ckpt.wait()
  garbage_meta(ckdir / "3")
  assert ckpt.restore_latest(state_at(0), PARAMS).step == 2
  ckpt.close()
  assert sorted(p.name for p in (ckdir.parent / "corrupt_checkpoints").iterdir()) == ["3",
                                                                                   "3.1"]


def test_no_restorable_checkpoint_is_one_line_naming_the_directory(ckdir, caplog):
  truncate_array_file(ckdir / "3")
  garbage_meta(ckdir / "2")
  delete_tree_metadata(ckdir / "1")
  ckpt = Checkpointer(ckdir, FINGERPRINT)
  ckpt.check_compatible()
  with caplog.at_level(logging.WARNING, logger="grpo_jax"):
    with pytest.raises(UserError) as raised:
      ckpt.restore_latest(state_at(0), PARAMS)
  message = str(raised.value)
  assert "\n" not in message and f"remove {ckdir} " in message and "1, 2, 3" not in message
  assert "steps 3, 2, 1" in message
  assert len(warnings_of(caplog)) == 3
  assert sorted(p.name for p in ckdir.iterdir()) == ["1", "2", "3", "reference"]  # kept
  assert not (ckdir.parent / "corrupt_checkpoints").exists()


def test_no_checkpoints_is_none_and_writes_nothing(tmp_path):
  ckpt = Checkpointer(tmp_path / "checkpoints", FINGERPRINT)
  ckpt.check_compatible()
  assert ckpt.restore_latest(state_at(0), PARAMS) is None
  assert not (tmp_path / "checkpoints").exists()


def test_another_model_is_not_damage(ckdir, caplog):
  garbage_meta(ckdir / "3")
  other = Checkpointer(ckdir, {**FINGERPRINT, "vocab_size": 64})
  with pytest.raises(IncompatibleCheckpointError, match="vocab_size: 32 in checkpoint vs 64"):
    other.check_compatible()  # decided by step 2, the newest readable meta
  with pytest.raises(IncompatibleCheckpointError):
    other.restore_latest(state_at(0), PARAMS)
  assert (ckdir / "3").exists() and not (ckdir.parent / "corrupt_checkpoints").exists()
  assert warnings_of(caplog) == []


def test_the_saved_meta_and_config_come_back_with_the_state(ckdir):
  restored = Checkpointer(ckdir, FINGERPRINT).restore_latest(state_at(0), PARAMS)
  assert restored.meta["data"] == 3
  assert restored.meta["config"] == pytest.approx({"lr": 0.3})
  garbage_meta(ckdir / "3")  # an unreadable meta: the previous step's comes back
  restored = Checkpointer(ckdir, FINGERPRINT).restore_latest(state_at(0), PARAMS)
  assert restored.step == 2 and restored.meta["config"] == pytest.approx({"lr": 0.2})


@pytest.mark.parametrize("damage", ["delete", "truncate", "no_manifest"])
def test_a_missing_or_broken_reference_is_none_and_rebuilt(ckdir, damage, caplog):
  reference = ckdir / "reference"
  if damage == "delete":
    shutil.rmtree(reference)
  elif damage == "truncate":
    os.truncate(largest_data_file(reference), 100)
  else:  # (without _METADATA a dict of arrays still restores: its paths are its keys)
    (reference / "manifest.ocdbt").unlink()
  ckpt = Checkpointer(ckdir, FINGERPRINT)
  with caplog.at_level(logging.WARNING, logger="grpo_jax"):
    restored = ckpt.restore_latest(state_at(0), PARAMS)
  assert restored.step == 3 and restored.reference is None
  assert_tree_equal(restored.state, state_at(3))
  [warning] = warnings_of(caplog)
  assert str(reference) in warning and "rebuilt from the starting params" in warning
  assert "\n" not in warning

  ckpt.save_reference(PARAMS)  # replaces the broken copy
  ckpt.close()
  assert sorted(p.name for p in ckdir.iterdir()) == ["1", "2", "3", "reference"]
  caplog.clear()
  again = Checkpointer(ckdir, FINGERPRINT).restore_latest(state_at(0), PARAMS)
  assert_tree_equal(again.reference, PARAMS)
  assert warnings_of(caplog) == []


def test_save_reference_keeps_a_complete_copy(ckdir):
  before = (ckdir / "reference" / "_CHECKPOINT_METADATA").stat().st_mtime_ns
  Checkpointer(ckdir, FINGERPRINT).save_reference({"w": jnp.zeros((3, 4))})
  assert (ckdir / "reference" / "_CHECKPOINT_METADATA").stat().st_mtime_ns == before


def moved_reference(step: int):
  return jax.tree.map(lambda x: (x * 0.5 + step).astype(jnp.bfloat16), PARAMS)


def test_a_step_that_saved_its_reference_restores_that_one(tmp_path, caplog):
  """sync_ref_model: the reference moves, so each step saves its own (in its compute
  dtype); a step restores it, not the starting one, and a damaged one makes the step
  unusable (the previous step is resumed from, with its own reference)."""
  ckdir = tmp_path / "checkpoints"
  ckpt = Checkpointer(ckdir, FINGERPRINT)
  ckpt.save_reference(PARAMS)
  ckpt.save(1, state_at(1), {"data": 1})  # before the first sync: no reference of its own
  for step in (2, 3):
    ckpt.save(step, state_at(step), {"data": step}, reference=moved_reference(step))
  ckpt.close()
  assert (ckdir / "3" / "reference").is_dir() and not (ckdir / "1" / "reference").exists()
  restored = Checkpointer(ckdir, FINGERPRINT).restore_latest(state_at(0), PARAMS)
  assert restored.step == 3
  assert_tree_equal(restored.reference, jax.tree.map(lambda x: x.astype(jnp.float32),
                                                     moved_reference(3)))  # exact: widened
  truncate_array_file(ckdir / "3", item="reference")
  with caplog.at_level(logging.WARNING, logger="grpo_jax"):
    restored = Checkpointer(ckdir, FINGERPRINT).restore_latest(state_at(0), PARAMS)
  assert restored.step == 2
  assert_tree_equal(restored.reference, jax.tree.map(lambda x: x.astype(jnp.float32),
                                                     moved_reference(2)))
  [warning] = warnings_of(caplog)
  assert f"{ckdir / '3'} cannot be restored" in warning
  shutil.rmtree(ckdir / "2")
  restored = Checkpointer(ckdir, FINGERPRINT).restore_latest(state_at(0), PARAMS)
  assert restored.step == 1
  assert_tree_equal(restored.reference, PARAMS)  # the starting one


# --- a disk that refuses the write ---------------------------------------------------------

def fill(disk: pathlib.Path, leave_bytes: int = 0) -> pathlib.Path:
  """Fills `disk` up, then frees `leave_bytes` again."""
  filler = disk / "filler"
  with open(filler, "wb", buffering=0) as f:
    try:
      while True:
        f.write(b"\0" * 4096)
    except OSError as e:
      assert e.errno == errno.ENOSPC
  if leave_bytes:
    os.truncate(filler, max(filler.stat().st_size - leave_bytes, 0))
  return filler


@pytest.fixture
def small_disk(tmp_path):
  """A 2 MiB tmpfs (needs root, or CAP_SYS_ADMIN): a real full / read-only disk."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                           capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
  yield disk
  subprocess.run(["mount", "-o", "remount,rw", str(disk)], capture_output=True)
  subprocess.run(["umount", "-l", str(disk)], check=True)


def save_and_wait(ckpt, step):
  ckpt.save(step, state_at(step), {"data": step})
  ckpt.wait()


def orbax_errors(caplog):
  return [r for r in caplog.records if r.name == "absl" and r.levelno >= logging.ERROR]


def assert_step_1_is_intact(ckdir, caplog):
  caplog.clear()
  ckpt = Checkpointer(ckdir, FINGERPRINT)
  restored = ckpt.restore_latest(state_at(0), PARAMS)
  assert restored.step == 1
  assert_tree_equal(restored.state, state_at(1))
  assert_tree_equal(restored.reference, PARAMS)
  assert warnings_of(caplog) == []
  save_and_wait(ckpt, 2)  # and saving works again
  ckpt.close()


@pytest.mark.parametrize("leave_bytes", [0, 16384], ids=["full", "nearly_full"])
def test_a_full_disk_is_one_line_and_the_last_checkpoint_survives(
    small_disk, leave_bytes, caplog):
  """Full: the write probe in save() fails at once. Nearly full (16 KiB left): Orbax's
  background writes fail, surfacing at wait()."""
  ckdir = small_disk / "checkpoints"
  ckpt = Checkpointer(ckdir, FINGERPRINT, max_to_keep=1)
  ckpt.save_reference(PARAMS)
  save_and_wait(ckpt, 1)
  filler = fill(small_disk, leave_bytes)
  with caplog.at_level(logging.WARNING):
    with pytest.raises(UserError) as raised:
      save_and_wait(ckpt, 2)
    ckpt.close()  # no second error from train.py's `finally: ckpt.close()`
  assert str(raised.value) == (
      f"cannot write checkpoint {ckdir / '2'}: No space left on device (the last complete "
      "checkpoint is step 1; a rerun resumes from it)")
  assert orbax_errors(caplog) == []  # Orbax's tracebacks about it are dropped
  filler.unlink()
  assert_step_1_is_intact(ckdir, caplog)
  assert sorted(p.name for p in ckdir.iterdir()) == ["1", "2", "reference"]  # no tmp left


FULL_DISK_RUN = """
import os, sys
import jax, jax.numpy as jnp, optax
from grpo_jax import grpo
from grpo_jax.checkpoint import Checkpointer, orbax_noise
from grpo_jax.errors import UserError
orbax_noise.install()  # as the command line does
disk = sys.argv[1]
params = {"w": jnp.arange(12.0).reshape(3, 4),
          "big": jax.random.normal(jax.random.key(0), (1024,))}
state = grpo.init_train_state(params, optax.adam(1e-3))
ckpt = Checkpointer(os.path.join(disk, "checkpoints"), {"arch": "tiny"})
ckpt.save_reference(params)
ckpt.save(1, state, {"data": 1})
ckpt.wait()
filler = os.path.join(disk, "filler")
with open(filler, "wb", buffering=0) as f:
  try:
    while True:
      f.write(bytes(4096))
  except OSError:
    pass
os.truncate(filler, os.path.getsize(filler) - 16384)
try:
  try:
    ckpt.save(2, state, {"data": 2})
    ckpt.wait()
  finally:
    ckpt.close()
except UserError as e:  # as `python -m grpo_jax.train` reports it
  sys.exit(f"grpo_jax: error: {e}")
"""


def test_a_full_disk_prints_one_line_in_a_real_process(small_disk, tmp_path):
  """All of the output, Orbax's loggers and unraisable-exception hooks as they come."""
  script = tmp_path / "full_disk_run.py"
  script.write_text(textwrap.dedent(FULL_DISK_RUN))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
  done = subprocess.run([sys.executable, str(script), str(small_disk)], capture_output=True,
                        text=True, env=env, timeout=120)
  assert done.returncode == 1
  assert (done.stdout + done.stderr).splitlines() == [
      f"grpo_jax: error: cannot write checkpoint {small_disk / 'checkpoints' / '2'}: No space "
      "left on device (the last complete checkpoint is step 1; a rerun resumes from it)"]


def test_a_read_only_disk_is_one_line_at_once(small_disk, caplog):
  ckdir = small_disk / "checkpoints"
  ckpt = Checkpointer(ckdir, FINGERPRINT)
  ckpt.save_reference(PARAMS)
  save_and_wait(ckpt, 1)
  subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
  with pytest.raises(UserError) as raised:
    save_and_wait(ckpt, 2)
  ckpt.close()
  assert str(raised.value) == (
      f"cannot write checkpoint {ckdir / '2'}: Read-only file system (the last complete "
      "checkpoint is step 1; a rerun resumes from it)")
  subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
  assert_step_1_is_intact(ckdir, caplog)


def test_a_full_disk_in_orbaxs_background_thread_simulated(tmp_path, monkeypatch, caplog):
  """Without a mount: the meta JSON write (Orbax's JsonCheckpointHandler, in its background
  save) raises ENOSPC; the real async machinery carries it to wait()."""
  ckdir = tmp_path / "checkpoints"
  ckpt = Checkpointer(ckdir, FINGERPRINT)
  ckpt.save_reference(PARAMS)
  save_and_wait(ckpt, 1)
  path_type = type(epath.Path(ckdir))
  write_text = path_type.write_text

  def full_disk(self, *args, **kwargs):
    if self.name == "metadata" and "2.orbax-checkpoint-tmp" in str(self):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return write_text(self, *args, **kwargs)

  monkeypatch.setattr(path_type, "write_text", full_disk)
  with caplog.at_level(logging.WARNING):
    with pytest.raises(UserError, match=r"^cannot write checkpoint .*/2: No space left on "
                                        r"device \(the last complete checkpoint is step 1;"):
      save_and_wait(ckpt, 2)
    ckpt.close()
  assert orbax_errors(caplog) == []
  monkeypatch.undo()
  assert_step_1_is_intact(ckdir, caplog)


def test_other_save_errors_are_not_disk_errors(tmp_path):
  ckpt = Checkpointer(tmp_path / "checkpoints", FINGERPRINT)
  with pytest.raises(TypeError, match="not JSON serializable"):  # raised by Orbax's thread
    ckpt.save(1, state_at(1), {"data": object()})
    ckpt.close()


def test_write_errnos_are_found_in_orbax_and_tensorstore_chains():
  def chained():
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as e:
      raise RuntimeError("Failed to run 4 Handler Commit operations") from e

  with pytest.raises(RuntimeError) as raised:
    chained()
  assert checkpoint.write_errno(raised.value) == errno.ENOSPC
  tensorstore = ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x\": Failed to "
                           "write 182 bytes to file 18 [os_error_code='28'] [spec=...]")
  assert checkpoint.write_errno(Exception("wrapped")) is None
  assert checkpoint.write_errno(tensorstore) == errno.ENOSPC
  assert checkpoint.write_errno(PermissionError(errno.EACCES, "denied")) == errno.EACCES
  assert checkpoint.write_errno(FileNotFoundError(errno.ENOENT, "gone")) is None


def _asyncio_task_report(exc: Exception, where: str) -> logging.LogRecord:
  """What asyncio logs for a task that died unobserved (base_events.default_exception_handler)."""
  return logging.LogRecord(
      "asyncio", logging.ERROR, "/usr/lib/python3.11/asyncio/base_events.py", 1,
      "Task exception was never retrieved\nfuture: <Task finished name='Task-93' "
      f"coro=<Store.write() done, defined at {where}:176> exception={exc!r}>", None,
      (type(exc), exc, None))


@pytest.mark.parametrize("message", [
    "cannot schedule new futures after shutdown",
    "cannot schedule new futures after interpreter shutdown",
    "Event loop is closed"])
def test_an_orbax_task_killed_by_a_failed_saves_shutdown_is_not_printed(monkeypatch, message):
  """The CI flake of stop 20: a metadata write task of the refused save was scheduled after
  its executor shut down, and asyncio printed its traceback after the one-line error."""
  failed = threading.Event()
  monkeypatch.setattr(orbax_noise, "_ORBAX_OPERATION_FAILED", failed)
  orbax_file = os.path.join(os.sep, "venv", "orbax", "checkpoint", "array_metadata_store.py")
  debris = _asyncio_task_report(RuntimeError(message), orbax_file)
  quiet = orbax_noise._QuietOrbaxWriteErrors()
  assert quiet.filter(debris)  # no save failed: it is a real error, and it is printed
  failed.set()
  assert not quiet.filter(debris)
  # Not debris: another error of an Orbax task, or the same error of someone else's task.
  assert quiet.filter(_asyncio_task_report(RuntimeError("boom"), orbax_file))
  assert quiet.filter(_asyncio_task_report(RuntimeError(message), "/srv/app/mine.py"))


@pytest.mark.parametrize("save_failed", [False, True])
def test_a_closed_loop_report_from_a_callback_thread_waits_for_the_saves_outcome(
    monkeypatch, save_failed):
  """The other flake: TensorStore's callback thread reports "Event loop is closed" (no
  object to attribute it to) before the failed save reaches the main thread. It is held:
  dropped if a save failed, printed as it came if none did."""
  failed = threading.Event()
  printed = []
  monkeypatch.setattr(orbax_noise, "_ORBAX_OPERATION_FAILED", failed)
  monkeypatch.setattr(orbax_noise, "_previous_unraisablehook", printed.append)
  monkeypatch.setattr(orbax_noise, "_HELD", orbax_noise._HeldReports())
  report = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), object=None,
                                 exc_type=RuntimeError, exc_traceback=None, err_msg=None)
  other = types.SimpleNamespace(exc_value=ValueError("mine"), object=None,
                                exc_type=ValueError, exc_traceback=None, err_msg=None)
  orbax_noise._quiet_unraisable(report)
  orbax_noise._quiet_unraisable(other)
  assert printed == [other]  # only the shutdown error waits
  if save_failed:
    failed.set()
  orbax_noise._HELD.release()
  assert printed == [other] if save_failed else [other, report]
  orbax_noise._HELD.release_at_exit()  # from now on nothing is held
  orbax_noise._quiet_unraisable(report)
  assert printed[-1] is report or save_failed
  assert len(printed) == (1 if save_failed else 3)
