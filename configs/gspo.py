"""GSPO on GSM8K: configs/gsm8k.py (same model, data, rewards, lengths) with the settings of
GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv:2507.18071, v2
section 5.1) as TRL's paper index reproduces them:

  python -m grpo_jax.train --config=configs/gspo.py --config.model_path=/path/to/model

What it changes against gsm8k.py:
  * importance_sampling_level "sequence": one importance ratio per completion, the exp of
    the mean of its tokens' log-ratios, clipped as a whole (token ratios are noisy over
    long sequences, and clipping them token by token destabilises training, above all of
    MoE models).
  * epsilon 3e-4, epsilon_high 4e-4: a sequence ratio moves far less than a token's, so
    the clip range is two orders of magnitude narrower than GRPO's 0.2.
  * beta 0.0: no KL term (GSPO's setting, per TRL's docs).
  * loss_type "grpo", as TRL's GSPO example (each completion weighs the same).
  * num_iterations 4: the paper splits each rollout batch into 4 mini-batches, 4 updates
    per batch, of which all but the first are off-policy; the ratio (and its clip) only
    act off-policy. This trainer updates on the whole batch, so 4 updates per batch
    (num_iterations) are its counterpart: the same updates per batch, each on the whole
    batch (4x the update compute of gsm8k.py).
"""

import pathlib

from grpo_jax.config import from_file


def get_config():
  c = from_file(pathlib.Path(__file__).with_name("gsm8k.py"))
  c.importance_sampling_level = "sequence"
  c.epsilon = 3e-4
  c.epsilon_high = 4e-4
  c.beta = 0.0
  c.loss_type = "grpo"
  c.num_iterations = 4
  return c
