"""Orbax checkpoints: the actor's train state every few steps, the frozen reference once.

Layout under `<workdir>/checkpoints/`:
  <step>/state       TrainState (actor params, AdamW state, step)       Orbax StandardSave
  <step>/meta        RNG key, data position, model fingerprint (JSON)   Orbax JsonSave
  reference/         frozen reference params, written once              Orbax StandardCheckpointer

Orbax writes each checkpoint into a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from grpo_jax.errors import UserError

log = logging.getLogger("grpo_jax")


class IncompatibleCheckpointError(UserError):
  """The workdir holds checkpoints of a different model."""


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

  @property
  def manager(self) -> ocp.CheckpointManager:
    """Created on first use, so that merely checking a workdir writes nothing."""
    if self._manager is None:
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep, create=True),
          item_names=("state", "meta"))
    return self._manager

  def latest_step(self) -> int | None:
    if not self.directory.exists():
      return None
    return self.manager.latest_step()

  def check_compatible(self) -> None:
    """Raises if the workdir's latest checkpoint was written for another model."""
    step = self.latest_step()
    if step is None:
      return
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    saved = meta.get("fingerprint", {})
    if saved != self.fingerprint:
      raise IncompatibleCheckpointError(
          f"workdir {self.directory.parent} holds checkpoints of an incompatible model "
          f"({_describe_difference(saved, self.fingerprint)}); use another --workdir or "
          "remove its checkpoints")

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    """Saves asynchronously; `state` must be a single (unreplicated) copy."""
    meta = {**meta, "fingerprint": self.fingerprint}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_serializable(state)), meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, like_state) -> tuple[Any, dict[str, Any]]:
    self.check_compatible()
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_tree(like_state)),
        meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  @property
  def reference_path(self) -> epath.Path:
    return self.directory / "reference"

  def save_reference(self, params) -> None:
    """Writes the frozen reference params once; later calls leave them alone."""
    if self.reference_path.exists():
      return
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(self.reference_path, _serializable(params))
    log.info("Saved the frozen reference params to %s", self.reference_path)

  def restore_reference(self, like_params):
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(self.reference_path, abstract_tree(like_params))

  def wait(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()

  def close(self) -> None:
    if self._manager is not None:
      self._manager.close()
      self._manager = None
