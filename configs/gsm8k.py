"""GRPO on GSM8K with a pretrained instruct model (Qwen2.5 / Qwen3 / Llama 3.x).

  python -m grpo_jax.train --config=configs/gsm8k.py \
      --config.model_path=/path/to/Qwen2.5-0.5B-Instruct --workdir=gs://bucket/gsm8k

The dataset is `openai/gsm8k` (config "main") by hub name when online; offline, point
`dataset` at a local file in the same format (columns `question`, `answer` ending in
"#### N"), e.g. --config.dataset=json:/data/gsm8k_train.jsonl --config.eval_size=200.

Whether a model fits a TPU slice, compiled here without one (pip install -e ".[tpu]"):

  python -m grpo_jax.plan --topology=v5e-16 --config=configs/gsm8k.py \
      --config.model_path=preset:qwen2.5-7b --config.parallelism=mesh --config.mesh.fsdp=16
"""

from grpo_jax.config import base_config

SYSTEM_PROMPT = (
    "Solve the math problem. Think step by step, then give the final answer on its own "
    "line as '#### <number>'.")


def get_config():
  c = base_config()  # GRPO practice: G=8, lr 5e-7, beta 0.04, epsilon 0.2, scale_rewards group
  c.model_path = ""  # required: a local Hugging Face directory
  c.dataset = "openai/gsm8k:main"
  c.prompt_column = "question"
  c.eval_split = "test"
  c.system_prompt = SYSTEM_PROMPT
  c.chat_template = "auto"
  c.reward_funcs = "correctness_reward,format_reward"
  c.max_prompt_length = 256
  c.max_completion_length = 384
  c.num_generations = 8
  c.prompts_per_step = 16
  c.loss_type = "dapo"  # long reasoning: no length bias (docs/loss.md)
  c.temperature = 1.0
  c.dtype = "bfloat16"
  c.scan_layers = True  # 24+ layers: one compiled block keeps compiles short
  c.max_steps = 1000
  c.eval_every = 100
  c.checkpoint_every = 100
  c.log_every = 1
  return c
