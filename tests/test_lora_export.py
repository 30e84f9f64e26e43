"""LoRA adapters against PEFT: both directions, on transformers models with random weights.

A PEFT model (Qwen2, Llama) whose LoRA B matrices are random (a zero B would hide every
layout or scaling error) is saved by PEFT itself; grpo_jax loads the base and the adapter
and must give PEFT's logits. Then grpo_jax writes the adapter back (`save_adapter`) and
PEFT loads it: the same logits again, and the tensors PEFT saved, bit for bit.
"""

import json

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
from flax import nnx

from grpo_jax.errors import UserError
from grpo_jax.models import from_pretrained, lora, peft_format
from test_hf import IDS, MASK, REAL, build_hf_model, hf_logits

TARGETS = {"qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "llama": ["q_proj", "v_proj", "down_proj"]}
RANK, ALPHA = 4, 12.0  # scaling 3: a missing or doubled scale fails


@pytest.fixture(scope="module", params=sorted(TARGETS))
def peft_adapter(request, tmp_path_factory):
  """(family, base dir, PEFT adapter dir, PEFT model) with random non-zero B matrices."""
  family = request.param
  base_dir = tmp_path_factory.mktemp(f"{family}_base")
  build_hf_model(family, seed=4).save_pretrained(base_dir)
  base = build_hf_model(family, seed=4)
  config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS[family],
                           lora_dropout=0.0, task_type="CAUSAL_LM")
  model = peft.get_peft_model(base, config).eval()
  torch.manual_seed(9)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "lora_B" in name:
        param.normal_(0.0, 0.3)
  adapter_dir = tmp_path_factory.mktemp(f"{family}_adapter")
  model.save_pretrained(adapter_dir)
  return family, base_dir, adapter_dir, model


def grpo_model(family, base_dir):
  model, _ = from_pretrained(base_dir)
  base_def, base = nnx.split(model)
  cfg = lora.LoraConfig(rank=RANK, alpha=ALPHA, targets=lora.target_modules(TARGETS[family]))
  policy_def, like = lora.adapted_model(model.cfg, cfg)
  return base_def, base, policy_def, like, model.cfg.replace(lora=cfg)


def our_logits(policy_def, base, adapters):
  model = nnx.merge(policy_def, lora.policy_params(base, adapters))
  return np.asarray(model(jnp.asarray(IDS), jnp.asarray(MASK)))


def test_a_peft_adapter_loads_and_gives_peft_logits(peft_adapter):
  family, base_dir, adapter_dir, model = peft_adapter
  _, base, policy_def, like, model_cfg = grpo_model(family, base_dir)
  adapters = peft_format.load_adapter(adapter_dir, model_cfg, like)
  theirs = hf_logits(model, IDS, MASK)
  ours = our_logits(policy_def, base, adapters)
  assert np.abs(ours - theirs)[REAL].max() < 1e-4
  plain = hf_logits(build_hf_model(family, seed=4), IDS, MASK)
  assert np.abs(theirs - plain)[REAL].max() > 1e-2  # the adapter changes the model


def test_our_export_is_what_peft_saved_and_peft_loads_it(peft_adapter, tmp_path):
  family, base_dir, adapter_dir, model = peft_adapter
  base_def, base, policy_def, like, model_cfg = grpo_model(family, base_dir)
  adapters = peft_format.load_adapter(adapter_dir, model_cfg, like)
  peft_format.save_adapter(adapters, model_cfg, tmp_path, str(base_dir))
  saved = safetensors.numpy.load_file(adapter_dir / peft_format.ADAPTER_FILE)
  ours = safetensors.numpy.load_file(tmp_path / peft_format.ADAPTER_FILE)
  assert sorted(ours) == sorted(saved)
  for name in saved:
    np.testing.assert_array_equal(ours[name], saved[name], err_msg=name)
  reloaded = peft.PeftModel.from_pretrained(build_hf_model(family, seed=4), tmp_path).eval()
  assert np.abs(hf_logits(reloaded, IDS, MASK) - hf_logits(model, IDS, MASK))[REAL].max() < 1e-6
  config = json.loads((tmp_path / peft_format.CONFIG_FILE).read_text())
  assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (
      RANK, ALPHA, sorted(TARGETS[family]))
  again = peft_format.load_adapter(tmp_path, model_cfg, like)
  for (_, a), (_, b) in zip(nnx.to_flat_state(adapters), nnx.to_flat_state(again)):
    np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))
  # The merged kernels give the same logits through the plain model.
  # (float32 rounding of two summation orders, on logits of magnitude ~5.)
  merged = nnx.merge(base_def, lora.merged_kernels(base, adapters, model_cfg.lora))
  diff = np.abs(np.asarray(merged(jnp.asarray(IDS), jnp.asarray(MASK)))
                - our_logits(policy_def, base, adapters))[REAL]
  assert diff.max() < 3e-4


def test_an_adapter_for_other_lora_settings_is_a_one_line_error(peft_adapter):
  family, base_dir, adapter_dir, _ = peft_adapter
  _, _, _, like, model_cfg = grpo_model(family, base_dir)
  other = model_cfg.replace(lora=lora.LoraConfig(rank=RANK, alpha=ALPHA + 1,
                                                 targets=model_cfg.lora.targets))
  with pytest.raises(UserError, match="lora_alpha: adapter 12.0, run 13.0"):
    peft_format.load_adapter(adapter_dir, other, like)
