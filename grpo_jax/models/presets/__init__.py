"""Model shapes without weights: `model_path="preset:<name>"` (the `config.json` of a public
checkpoint, so `grpo_jax.plan` can size and compile a run for a model that is not here).

Training needs weights, so `grpo_jax.train` refuses a preset in one line."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from grpo_jax.errors import UserError

PREFIX = "preset:"


def names() -> list[str]:
  return sorted(f.name[:-len(".json")] for f in resources.files(__package__).iterdir()
                if f.name.endswith(".json"))


def is_preset(model_path: str) -> bool:
  return str(model_path).startswith(PREFIX)


def hf_config(model_path: str) -> dict[str, Any]:
  """The Hugging Face config dict of `preset:<name>` (names are case-insensitive)."""
  name = str(model_path)[len(PREFIX):].strip().lower()
  if name not in names():
    raise UserError(f"model_path={model_path!r}: no such preset; presets: {', '.join(names())}")
  return json.loads(resources.files(__package__).joinpath(f"{name}.json").read_text())
