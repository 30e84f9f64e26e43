"""Dr. GRPO on GSM8K: configs/gsm8k.py (same model, data, rewards, lengths) with the
settings of Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
Perspective", arXiv:2503.20783):

  python -m grpo_jax.train --config=configs/dr_grpo.py --config.model_path=/path/to/model

What it changes against gsm8k.py, GRPO "done right" by removing its two biases:
  * loss_type "dr_grpo": every completion's token sum divided by the same constant,
    batch * max_completion_length, instead of by its own length (GRPO's length bias:
    long wrong answers are penalised less per token than short ones).
  * scale_rewards "none": advantages r - mean_group, not divided by the group std
    (GRPO's question-difficulty bias: groups that are nearly all right or all wrong get
    their small differences blown up).
  * beta 0.0: no KL term (rule-based rewards need no anchor; the paper drops it).
"""

import pathlib

from grpo_jax.config import from_file


def get_config():
  c = from_file(pathlib.Path(__file__).with_name("gsm8k.py"))
  c.loss_type = "dr_grpo"
  c.scale_rewards = "none"
  c.beta = 0.0
  return c
