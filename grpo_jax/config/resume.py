"""What a resumed run may change: the fields that do not change its trajectory, and the
differences between a checkpoint's config and this run's."""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from grpo_jax.config.defaults import base_config

# Fields that change how a run is logged, checkpointed, evaluated or laid out on devices,
# not the trajectory it follows (layout fields change results only at float rounding):
# a resume may change them. Every other field must match the checkpoint's.
RESUME_FREE_FIELDS = frozenset({
    "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "num_sample_texts",
    "max_train_minutes", "eval_batch_size", "break_workdir_lock",
    "accuracy_reward", "export_hf", "distributed", "parallelism", "mesh", "remat",
    "scan_layers", "attention", "micro_batch_size", "memory_limit_gib", "logprob_chunk_size", "train_length_bucket",
    "preemption_grace_seconds", "max_nonfinite_steps", "allow_config_change",
    "tool_timeout_seconds", "reward_timeout_seconds"})


def as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON data (tuples become lists), as a checkpoint stores it."""
  return json.loads(json.dumps(config.to_dict(), default=str))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def trajectory_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """'field: saved -> now' for each field outside RESUME_FREE_FIELDS that differs between
  a checkpoint's config and this run's (both as `as_json` gives them). A field one side
  lacks (written by another version) counts as its default."""
  defaults = _flatten(as_json(base_config()))
  old, new = ({**defaults, **_flatten(c)} for c in (saved, current))
  return [f"{field}: {old.get(field)!r} -> {new.get(field)!r}"
          for field in sorted(set(old) | set(new))
          if field.split(".")[0] not in RESUME_FREE_FIELDS and old.get(field) != new.get(field)]
