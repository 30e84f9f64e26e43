"""The embedded CPU demo: multi-step arithmetic, a tiny model, done in a few minutes.

A model of ~0.1M parameters is warmed up on imperfect demonstrations (60% of them skip
the reasoning and guess the answer), then GRPO must discover that writing the steps out
pays: held-out greedy accuracy rises as the policy switches from guessing to reasoning.
"""

from grpo_jax.config import base_config


def get_config():
  c = base_config()
  c.dataset = "demo:arithmetic"
  c.reward_funcs = "correctness_reward,format_reward"
  c.model.update(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=256)
  c.max_prompt_length = 8
  c.max_completion_length = 24
  c.num_generations = 8
  c.prompts_per_step = 16
  c.learning_rate = 1e-4  # a tiny model; real models use 5e-7 (base_config)
  c.lr_scheduler_type = "constant"
  c.beta = 0.04
  c.sft_steps = 1500
  c.sft_batch_size = 64
  c.sft_learning_rate = 3e-3
  c.sft_reasoning_prob = 0.4
  c.max_steps = 100
  c.eval_every = 10
  c.checkpoint_every = 20
  c.log_every = 1
  return c
