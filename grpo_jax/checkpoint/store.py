"""Orbax checkpoints: the actor's train state every few steps, the frozen reference once.

Layout under `<workdir>/checkpoints/`:
  <step>/state       TrainState (actor params, AdamW state, step)       Orbax StandardSave
  <step>/meta        RNG key, data position, model fingerprint (JSON)   Orbax JsonSave
  <step>/reference   the reference as of <step>, only when it moves     Orbax StandardSave
                     (sync_ref_model), in its compute dtype
  reference/         the starting reference params, written once        Orbax StandardCheckpointer

A step's own `reference` item, where there is one, is the reference that step restores
(a synced reference changes every ref_model_sync_steps updates, so a resume needs the one
of its step); without one, the step restores the starting `reference/`.

With LoRA `<step>/state` holds the adapters and their AdamW state only, and there is no
reference at all: the frozen base is the reference and is rebuilt from its source (the
model checkpoint, the demo's warm-up). The meta's fingerprint carries the base weights'
digest (`lora_base_weights`), so adapters are never restored onto another base.

Orbax writes each checkpoint into a temporary directory (`<step>.orbax-checkpoint-tmp`)
and renames it when complete, so a run killed mid-save leaves the previous checkpoint as
the latest one. What Orbax cannot guard against (a truncated file, a deleted or damaged
piece of a finished checkpoint) `restore_latest` handles: it resumes from the newest
checkpoint that restores completely and moves the damaged newer ones to
`<workdir>/corrupt_checkpoints/<step>`, one warning line each.

Orbax saves asynchronously: a full or read-only disk surfaces in a background thread and
then at the next `save`/`wait`/`close`, as a chain of Orbax/TensorStore exceptions and
error logs with tracebacks. Those become one UserError line here: "cannot write checkpoint
<dir>/<step>: No space left on device (the last complete checkpoint is step N; ...)"
(`disk`). Orbax's own logs of that failure and the debris of its abandoned coroutines are
dropped by `orbax_noise`, which the command line installs. A full or read-only disk at the
time of `save` fails at once, in a one-byte write probe.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from etils import epath

from grpo_jax import hosts
from grpo_jax.checkpoint import orbax_noise
from grpo_jax.checkpoint.disk import describe_exception, one_line, write_errno
from grpo_jax.errors import UserError

log = logging.getLogger("grpo_jax")

CORRUPT_DIRNAME = "corrupt_checkpoints"  # a sibling of the checkpoints directory


class IncompatibleCheckpointError(UserError):
  """The workdir holds checkpoints of a different model."""


class Restored(NamedTuple):
  """The newest checkpoint that restored completely.

  `meta` is the saved JSON dict (what the caller passed to `save`, with "fingerprint"
  added); `reference` is the step's own reference item if it has one, else the starting
  reference params, or None when those were missing or unreadable: the caller rebuilds
  them from its starting params and calls `save_reference`.
  """
  step: int
  state: Any
  meta: dict[str, Any]
  reference: Any | None


def _serializable(tree):
  """What Orbax can write. Multi-host, our single copy lives on each host's first device
  (host-local arrays, which Orbax refuses): numpy arrays instead, written by the primary
  host. Single-host, jax arrays, which Orbax saves asynchronously."""
  return jax.device_get(tree) if jax.process_count() > 1 else tree


def abstract_tree(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _describe_difference(saved: dict[str, Any], current: dict[str, Any]) -> str:
  keys = sorted(set(saved) | set(current))
  diffs = [f"{k}: {saved.get(k)!r} in checkpoint vs {current.get(k)!r} now"
           for k in keys if saved.get(k) != current.get(k)]
  return "; ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "")


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(f"grpo_jax_checkpoint:{name}")


class Checkpointer:
  """Saves and restores the actor train state (+ JSON metadata) and the reference params.

  `fingerprint` describes the model (architecture, tokenizer size); restoring into a run
  whose fingerprint differs raises IncompatibleCheckpointError before anything is loaded.
  """

  def __init__(self, directory, fingerprint: dict[str, Any], max_to_keep: int = 3):
    self.directory = epath.Path(directory)
    self.fingerprint = fingerprint
    self._max_to_keep = max_to_keep
    self._manager = None
    self._pending_step: int | None = None  # saved asynchronously, not yet known complete
    self._reported_write_error = False  # a write failure already raised as a UserError
    self._reference_unreadable = False  # restore_latest found reference/ missing or broken

  @property
  def manager(self) -> ocp.CheckpointManager:
    """Created on first use, so that merely checking a workdir writes nothing."""
    if self._manager is None:
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep, create=True),
          item_names=("state", "meta", "reference"))
    return self._manager

  @property
  def corrupt_directory(self) -> epath.Path:
    """Where restore_latest moves checkpoints that cannot be restored: beside the
    checkpoints directory (in the workdir), out of Orbax's sight."""
    return self.directory.parent / CORRUPT_DIRNAME

  def step_path(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def latest_step(self) -> int | None:
    if not self.directory.exists():
      return None
    return self.manager.latest_step()

  def _steps_newest_first(self) -> list[int]:
    if not self.directory.exists():
      return []
    self.manager.reload()  # what is on disk now, not what the manager saw when created
    return sorted(self.manager.all_steps(), reverse=True)

  # --- reading ---------------------------------------------------------------------------

  def _read_meta(self, step: int) -> tuple[dict[str, Any] | None, str | None]:
    """(meta, None), or (None, why it cannot be read)."""
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # pylint: disable=broad-except  # any failure: unreadable
      return None, self._reason(step, "meta", e)
    if not isinstance(meta, dict):
      return None, f"meta holds {type(meta).__name__}, not a JSON object"
    return meta, None

  def _reason(self, step: int, item: str, exc: BaseException) -> str:
    """Why `step` could not be restored: a missing piece if one is plainly missing, and
    the exception (type + first line of its message)."""
    path = self.step_path(step)
    missing = None
    for part in (item, f"{item}/metadata" if item == "meta" else f"{item}/_METADATA"):
      if not (path / part).exists():
        missing = f"{part}{'/' if part == item else ''} is missing"
        break
    described = describe_exception(exc)
    return one_line(f"{missing}: {described}" if missing else described)

  def _incompatible(self, saved: dict[str, Any]) -> IncompatibleCheckpointError:
    return IncompatibleCheckpointError(
        f"workdir {self.directory.parent} holds checkpoints of an incompatible model "
        f"({_describe_difference(saved, self.fingerprint)}); use another --workdir or "
        "remove its checkpoints")

  def check_compatible(self) -> None:
    """Raises if the workdir's newest readable checkpoint was written for another model.

    A checkpoint whose metadata cannot be read is passed over here (restore_latest reports
    and moves it); so is a workdir without checkpoints.
    """
    for step in self._steps_newest_first():
      meta, _ = self._read_meta(step)
      if meta is not None and isinstance(meta.get("fingerprint"), dict):
        if meta["fingerprint"] != self.fingerprint:
          raise self._incompatible(meta["fingerprint"])
        return

  def restore(self, step: int, like_state) -> tuple[Any, dict[str, Any]]:
    """(state, meta) of `step` exactly, raising whatever Orbax raises (see restore_latest)."""
    self.check_compatible()
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_tree(like_state)),
        meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def restore_latest(self, like_state, like_reference) -> Restored | None:
    """The newest checkpoint that restores completely, with the reference params.

    Newest first, a step whose metadata cannot be read, lacks the model fingerprint, or
    whose state fails to restore (for any reason) is passed over; once an older step
    restores, each passed-over one is moved to `<workdir>/corrupt_checkpoints/<step>`
    (so that Orbax no longer counts it as the latest, and saving its step number again
    works) with one warning line naming it, the reason and where it went.

    None if there are no checkpoints. UserError (one line) if there are but none restores:
    then nothing is moved. IncompatibleCheckpointError if the newest step with readable
    metadata was written for another model: that is not damage, so nothing is moved.
    `like_state` / `like_reference` are pytrees of the shapes and dtypes to restore into;
    `like_reference` None: the run keeps no reference (LoRA: the base is the reference),
    and `Restored.reference` is None.
    """
    steps = self._steps_newest_first()
    if not steps:
      return None
    passed_over: list[tuple[int, str]] = []
    for step in steps:
      meta, reason = self._read_meta(step)
      if reason is None:
        saved = meta.get("fingerprint")
        if not isinstance(saved, dict):
          reason = "its meta holds no model fingerprint"
        elif saved != self.fingerprint:
          raise self._incompatible(saved)
      if reason is None:
        state, reason = self._restore_item(step, "state", like_state)
      step_reference = None
      if reason is None and (self.step_path(step) / "reference").exists():
        # A step that saved its reference needs that one: the starting one is not it.
        step_reference, reason = self._restore_item(step, "reference", like_reference)
      if reason is not None:
        passed_over.append((step, reason))
        continue
      self._move_corrupt(passed_over, resumed_from=step)
      if like_reference is None:
        reference = None
      else:
        reference = (step_reference if step_reference is not None
                     else self._restore_reference_or_none(like_reference))
      return Restored(step, state, meta, reference)

    for step, reason in passed_over:
      log.warning("checkpoint %s cannot be restored (%s)", self.step_path(step), reason)
    raise UserError(
        f"no checkpoint in {self.directory} can be restored (steps "
        f"{', '.join(str(s) for s, _ in passed_over)}: see the warnings above); remove "
        f"{self.directory} to start afresh")

  def _restore_item(self, step: int, item: str, like) -> tuple[Any, str | None]:
    """(the item of `step`, None), or (None, why it cannot be restored)."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          **{item: ocp.args.StandardRestore(abstract_tree(like))}))
    except Exception as e:  # pylint: disable=broad-except  # any failure: unusable
      orbax_noise.mark_failed()
      return None, self._reason(step, item, e)
    return restored[item], None

  def _corrupt_destination(self, step: int) -> epath.Path:
    base = self.corrupt_directory
    for suffix in itertools.chain([""], (f".{i}" for i in itertools.count(1))):
      destination = base / f"{step}{suffix}"
      if not destination.exists():
        return destination
    raise AssertionError("unreachable")

  def _move_corrupt(self, passed_over: list[tuple[int, str]], resumed_from: int) -> None:
    if not passed_over:
      return
    for step, reason in passed_over:
      source, destination = self.step_path(step), self._corrupt_destination(step)
      if hosts.is_primary():
        try:
          destination.parent.mkdir(parents=True, exist_ok=True)
          source.rename(destination)
        except OSError as e:
          raise UserError(
              f"checkpoint {source} cannot be restored ({reason}) nor moved to "
              f"{destination} ({e.strerror or e}); remove it to resume from step "
              f"{resumed_from}") from None
      log.warning("checkpoint %s cannot be restored (%s); moved it to %s and resuming from "
                  "step %d", source, reason, destination, resumed_from)
    _sync("moved_corrupt")
    self.manager.reload()

  # --- the reference params --------------------------------------------------------------

  @property
  def reference_path(self) -> epath.Path:
    return self.directory / "reference"

  def _restore_reference_or_none(self, like_params):
    path = self.reference_path
    if not path.exists():
      problem = "are missing"
    else:
      try:
        return self.restore_reference(like_params)
      except Exception as e:  # pylint: disable=broad-except  # any failure: rebuild them
        orbax_noise.mark_failed()
        problem = f"cannot be restored ({one_line(describe_exception(e))})"
    self._reference_unreadable = True
    log.warning("the frozen reference params %s %s; they will be rebuilt from the starting "
                "params", path, problem)
    return None

  def restore_reference(self, like_params):
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(self.reference_path, abstract_tree(like_params))

  def save_reference(self, params) -> None:
    """Writes the frozen reference params; a complete earlier copy is left alone, unless
    restore_latest found it unreadable. Atomic: written beside as `reference.new`, then
    renamed over the old one (a crash leaves either the old or the new, never half)."""
    path = self.reference_path
    if (path.exists() and not self._reference_unreadable
        and (path / "_CHECKPOINT_METADATA").exists()):
      return
    new, old = path.parent / f"{path.name}.new", path.parent / f"{path.name}.old"
    if hosts.is_primary():
      for stale in (new, old):
        if stale.exists():
          stale.rmtree()
    _sync("reference_start")
    try:
      self._check_writable(path.parent)
      with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(new, _serializable(params))
    except Exception as e:  # pylint: disable=broad-except  # only the disk's are translated
      code = write_errno(e)
      if code is None:
        raise
      log.debug("writing %s failed", new, exc_info=True)
      self._reported_write_error = True
      raise UserError(f"cannot write the reference params {path}: {os.strerror(code)}"
                      ) from None
    if hosts.is_primary():
      if path.exists():
        path.rename(old)
      new.rename(path)
      if old.exists():
        old.rmtree()
    _sync("reference_done")
    self._reference_unreadable = False
    log.info("Saved the frozen reference params to %s", path)

  # --- writing ---------------------------------------------------------------------------

  def _check_writable(self, directory: epath.Path) -> None:
    """Writes and removes a one-byte file in `directory` (local paths only): a full or
    read-only disk then fails here, at once, instead of in Orbax's background threads
    (which on a read-only disk leave threads waiting minutes for a signal)."""
    if "://" in str(directory) or not os.path.isdir(directory):
      return
    fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=os.fspath(directory))
    try:
      os.write(fd, b"\0")
    finally:
      os.close(fd)
      os.unlink(probe)

  def _last_complete_step(self, failed: int | None) -> int | None:
    """The newest finished step directory on disk other than `failed`."""
    try:
      steps = [int(p.name) for p in self.directory.iterdir()
               if p.name.isdigit() and int(p.name) != failed]
    except OSError:
      return None
    return max(steps, default=None)

  def _write_error(self, step: int | None, exc: BaseException) -> UserError | None:
    """The one-line UserError for a write the disk refused (None for any other error)."""
    code = write_errno(exc)
    if code is None:
      return None
    orbax_noise.mark_failed()
    log.debug("writing checkpoint %s failed", step, exc_info=exc)
    where = self.step_path(step) if step is not None else self.directory
    last = self._last_complete_step(step)
    # The partial `<step>.orbax-checkpoint-tmp` stays: other threads of the failed save may
    # still be writing into it. Orbax ignores it, and removes it before saving `step` again.
    self._reported_write_error = True
    return UserError(
        f"cannot write checkpoint {where}: {os.strerror(code)} ("
        + (f"the last complete checkpoint is step {last}; a rerun resumes from it)"
           if last is not None else "no complete checkpoint yet)"))

  def save(self, step: int, state, meta: dict[str, Any], reference=None) -> None:
    """Saves asynchronously; `state` (and `reference`: the reference as of this step, for
    a run whose reference moves) must be a single (unreplicated) copy.

    A disk that refuses the write (full, read-only, ...) raises a one-line UserError here
    or at the next save/wait/close (the previous checkpoint stays as it was)."""
    self.wait()  # the previous save's failure is the previous step's
    meta = {**meta, "fingerprint": self.fingerprint}
    items = dict(state=ocp.args.StandardSave(_serializable(state)), meta=ocp.args.JsonSave(meta))
    if reference is not None:
      items["reference"] = ocp.args.StandardSave(_serializable(reference))
    try:
      manager = self.manager  # creates the directory on first use
      self._check_writable(self.directory)
      saved = manager.save(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except  # only the disk's are translated
      error = self._write_error(step, e)
      if error is None:
        raise
      raise error from None
    if saved:
      self._pending_step = step

  def wait(self) -> None:
    """Blocks until the pending save is complete (raises its write failure, if any)."""
    if self._manager is None:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  # only the disk's are translated
      step, self._pending_step = self._pending_step, None
      error = self._write_error(step, e)
      if error is None:
        raise
      raise error from None
    self._pending_step = None
    orbax_noise.save_completed()

  def close(self) -> None:
    """Waits for the pending save and closes. A write failure already raised as a
    UserError is not raised again (train.py closes in a `finally`)."""
    if self._manager is None:
      return
    manager, self._manager = self._manager, None
    try:
      manager.close()
    except Exception as e:  # pylint: disable=broad-except  # only the disk's are translated
      try:  # Orbax's close stops at the failed wait: close the rest too
        manager.close()
      except Exception:  # pylint: disable=broad-except
        pass
      already_reported = self._reported_write_error
      step, self._pending_step = self._pending_step, None
      error = self._write_error(step, e)
      if error is None:
        raise
      if not already_reported:
        raise error from None
    self._pending_step = None
    orbax_noise.save_completed()
