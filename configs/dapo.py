"""DAPO on GSM8K: configs/gsm8k.py (same model, data, rewards, lengths) with the settings of
DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
arXiv:2503.14476) and verl's DAPO recipe (recipe/dapo/run_dapo_qwen2.5_32b.sh):

  python -m grpo_jax.train --config=configs/dapo.py --config.model_path=/path/to/model

What it changes against gsm8k.py:
  * Clip-higher: epsilon 0.2, epsilon_high 0.28 (a wider upper clip lets low-probability
    tokens gain mass: no entropy collapse).
  * Token-level loss: loss_type "dapo" (gsm8k.py's already), normalised by the global
    batch's tokens.
  * No KL term: beta 0.0 (the policy may move as far from the start as the rewards pull).
  * Dynamic sampling: groups whose rewards are all equal (all right or all wrong) carry no
    gradient; they are dropped and more prompts sampled, up to max_num_gen_batches = 10
    sampling rounds per step (verl's recipe), until prompts_per_step informative groups
    are gathered.
  * Overlong reward shaping: the built-in soft_overlong_punishment reward (metric
    rewards/soft_overlong_punishment_reward/mean) falls from 0 to -1 over the last
    soft_punish_cache tokens before max_completion_length. soft_punish_cache 0 means a
    fifth of max_completion_length: DAPO's 4,096 of 20,480, and it follows an override of
    max_completion_length.
  * mask_truncated_completions False: the paper's first remedy for truncated samples,
    overlong filtering (leaving them out of the loss), is superseded by the soft
    punishment, which verl's recipe uses alone. With both, a truncated completion would
    never be pushed down by its own -1: it would leave the loss and only shift its
    group's baseline.
  * Optimiser: AdamW, constant learning rate 1e-6 after a linear warm-up of 20 rollout
    steps (2% of max_steps = 1000), weight decay 0.1 (matrices only), gradient clip 1.0.
  * Sampling at temperature 1.0, top_p 1.0 (gsm8k.py's already).
The paper samples 16 completions per prompt; this keeps gsm8k.py's 8 for the same cost per
step (--config.num_generations=16 for the paper's).
"""

import pathlib

from grpo_jax.config import from_file


def get_config():
  c = from_file(pathlib.Path(__file__).with_name("gsm8k.py"))
  c.loss_type = "dapo"
  c.epsilon = 0.2
  c.epsilon_high = 0.28
  c.beta = 0.0
  c.dynamic_sampling = True
  c.max_num_gen_batches = 10
  c.reward_funcs = "correctness_reward,format_reward,soft_overlong_punishment"
  c.soft_punish_cache = 0  # a fifth of max_completion_length (DAPO: 4096 of 20480)
  c.mask_truncated_completions = False
  c.temperature = 1.0
  c.top_p = 1.0
  c.learning_rate = 1e-6
  c.lr_scheduler_type = "constant"
  c.warmup_ratio = 20 / c.max_steps
  c.weight_decay = 0.1
  c.max_grad_norm = 1.0
  return c
