"""LoRA on GSM8K: configs/gsm8k.py (same model, data, rewards, lengths) training rank-16
adapters on every projection of a frozen bfloat16 base:

  python -m grpo_jax.train --config=configs/gsm8k_lora.py --config.model_path=/path/to/model
  # QLoRA: add --config.lora.base_quantization=nf4

What it changes against gsm8k.py:
  * lora.rank 16, lora.alpha 32 (scale 2), lora.target_modules "all-linear": the common
    GRPO + PEFT setting (TRL's examples use r=16, alpha=32 on all linear layers).
  * lora.base_dtype bfloat16: the frozen base in half the bytes (it is also the reference:
    no reference copy exists with LoRA).
  * learning_rate 1e-5: adapters take a larger step than full fine-tuning's 5e-7 (LoRA's
    update is scaled by alpha / rank on a rank-16 subspace).
"""

import pathlib

from grpo_jax.config import from_file


def get_config():
  c = from_file(pathlib.Path(__file__).with_name("gsm8k.py"))
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.target_modules = "all-linear"
  c.lora.base_dtype = "bfloat16"
  c.learning_rate = 1e-5
  return c
