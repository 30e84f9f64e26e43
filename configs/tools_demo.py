"""The tools demo: the embedded arithmetic task with a calculator the model may call.

The warm-up demonstrations call the calculator only 30% of the time and guess the answer
otherwise (`#### N`, usually wrong). GRPO, rewarded for the right answer alone, has to find
that calling `calculator(expression)` and copying its result pays. The calls are written
hermes-style (`<tool_call>{"name": "calculator", "arguments": {...}}</tool_call>`, as
Qwen2.5 and SmolLM2 do); the response comes back as `<tool_response>5</tool_response>`,
prefilled into the row's KV cache, and the model goes on to its answer.

  python -m grpo_jax.train --config=configs/tools_demo.py --workdir=output_tools
"""

import pathlib

from grpo_jax.config import from_file


def get_config():
  c = from_file(pathlib.Path(__file__).with_name("default.py"))
  c.tools = "calculator"
  c.max_tool_calling_iterations = 2
  c.reward_funcs = "correctness_reward"
  c.accuracy_reward = "correctness_reward"
  # a call is ~61 tokens (one per character), its response 3-5, the answer 7
  c.max_completion_length = 80
  c.train_length_bucket = 16
  c.sft_reasoning_prob = 0.3  # the share of warm-up demonstrations that call the tool
  return c
