"""LoRA adapters as a PEFT adapter folder, which `peft.PeftModel.from_pretrained` loads onto
the base model in transformers, and back.

  adapter_model.safetensors  base_model.model.model.layers.{i}.{attn|mlp}.{proj}.lora_A.weight
                             [r, in] and ...lora_B.weight [out, r] (torch Linear layout: our
                             A [in, r] and B [r, out] transposed), one tensor per layer
  adapter_config.json        PEFT's LoraConfig: r, lora_alpha, lora_dropout, target_modules

PEFT's forward is base(x) + lora_B(lora_A(dropout(x))) * lora_alpha / r: ours, name for name.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
import safetensors.numpy
from flax import nnx

from grpo_jax.errors import UserError
from grpo_jax.models.hf import _hf_name
from grpo_jax.models.transformer import ModelConfig

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
_PREFIX = "base_model.model."  # PeftModel wraps the causal LM as base_model.model
_PEFT_NAMES = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight"}
_PEFT_NAME = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\."
                        r"(\w+)\.(lora_A|lora_B)\.weight$")


def peft_name(path: tuple[str, ...], layer: int) -> str:
  """PEFT's tensor name for layer `layer` of our adapter at `path` (e.g. blocks/self_attn/
  q_proj/lora_a)."""
  module = _hf_name(path[:-1] + ("kernel",), layer)[:-len("weight")]
  return _PREFIX + module + _PEFT_NAMES[path[-1]]


def adapter_config(model_cfg: ModelConfig, base_model_name_or_path: str) -> dict[str, Any]:
  """adapter_config.json: PEFT's LoraConfig fields for these adapters (inference mode)."""
  lora = model_cfg.lora
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
          "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
          "target_modules": list(lora.targets), "bias": "none", "fan_in_fan_out": False,
          "use_rslora": False, "use_dora": False, "init_lora_weights": True,
          "modules_to_save": None, "inference_mode": True,
          "base_model_name_or_path": str(base_model_name_or_path)}


def save_adapter(adapters: nnx.State, model_cfg: ModelConfig, path, base_model_name_or_path,
                 tokenizer=None) -> None:
  """Writes `adapters` (stacked over layers) as a PEFT adapter folder at `path`."""
  os.makedirs(path, exist_ok=True)
  tensors = {}
  for key, var in nnx.to_flat_state(adapters):
    value = np.asarray(var.value, np.float32)
    for layer in range(value.shape[0]):
      tensors[peft_name(key, layer)] = np.ascontiguousarray(value[layer].T)
  safetensors.numpy.save_file(tensors, os.path.join(path, ADAPTER_FILE),
                              metadata={"format": "pt"})
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(adapter_config(model_cfg, base_model_name_or_path), f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(os.fspath(path))


def load_adapter(path, model_cfg: ModelConfig, like: nnx.State) -> nnx.State:
  """A PEFT adapter folder as our adapter state (shaped like `like`, e.g.
  `lora.adapted_model(...)[1]`); its r, lora_alpha and target_modules must be the run's
  (`model_cfg.lora`), and every tensor must be there: one line names what differs."""
  with open(os.path.join(path, CONFIG_FILE)) as f:
    saved = json.load(f)
  lora = model_cfg.lora
  targets = saved.get("target_modules")
  targets = sorted(targets) if isinstance(targets, list) else targets
  wanted = {"r": lora.rank, "lora_alpha": lora.alpha, "target_modules": sorted(lora.targets)}
  found = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"), "target_modules": targets}
  differ = [f"{k}: adapter {found[k]!r}, run {wanted[k]!r}" for k in wanted
            if found[k] != wanted[k]]
  if differ:
    raise UserError(f"the PEFT adapter in {path} does not fit lora.*: {'; '.join(differ)}")
  tensors = safetensors.numpy.load_file(os.path.join(path, ADAPTER_FILE))
  unknown = sorted(n for n in tensors if not _PEFT_NAME.match(n))
  if unknown:
    raise UserError(f"the PEFT adapter in {path} holds tensors that are not LoRA A/B of the "
                    f"decoder's projections: {', '.join(unknown[:5])}")
  out = []
  for key, var in nnx.to_flat_state(like):
    names = [peft_name(key, layer) for layer in range(var.value.shape[0])]
    missing = [n for n in names if n not in tensors]
    if missing:
      more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
      raise UserError(f"the PEFT adapter in {path} lacks {missing[0]}{more}")
    stacked = np.stack([tensors[n].T for n in names]).astype(np.float32)
    if stacked.shape != tuple(var.value.shape):
      raise UserError(f"the PEFT adapter in {path}: {names[0]} has shape {tensors[names[0]].shape}"
                      f", the model needs {tuple(var.value.shape[1:])[::-1]}")
    out.append((key, var.replace(stacked)))
  return nnx.from_flat_state(out)


__all__ = ["ADAPTER_FILE", "CONFIG_FILE", "peft_name", "adapter_config", "save_adapter",
           "load_adapter"]
